//! The writer: each [`Item`] back to its bytes, exactly as QEMU wrote it (a parsed stream written back
//! is byte-identical), and [`RamBody::Ref`] in the relay dialect's encoding.

use super::*;

/// Appends the bytes of `item` to `out`. A RAM record is written with its block's name when it has
/// one (`block_name`), with `RAM_SAVE_FLAG_CONTINUE` otherwise.
pub fn write(item: &Item, out: &mut Vec<u8>) {
    match item {
        Item::Header { version } => {
            out.extend_from_slice(&FILE_MAGIC.to_be_bytes());
            out.extend_from_slice(&version.to_be_bytes());
        }
        Item::Configuration { machine } => {
            out.push(VM_CONFIGURATION);
            out.extend_from_slice(&(machine.len() as u32).to_be_bytes());
            out.extend_from_slice(machine.as_bytes());
        }
        Item::SectionStart {
            id,
            name,
            instance,
            version,
        } => {
            out.push(VM_SECTION_START);
            out.extend_from_slice(&id.to_be_bytes());
            short_string(name, out);
            out.extend_from_slice(&instance.to_be_bytes());
            out.extend_from_slice(&version.to_be_bytes());
        }
        Item::SectionPart { id } => {
            out.push(VM_SECTION_PART);
            out.extend_from_slice(&id.to_be_bytes());
        }
        Item::SectionEnd { id } => {
            out.push(VM_SECTION_END);
            out.extend_from_slice(&id.to_be_bytes());
        }
        Item::RamMemSize { total } => out.extend_from_slice(&(total | FLAG_MEM_SIZE).to_be_bytes()),
        Item::RamBlock(block) => {
            short_string(&block.name, out);
            out.extend_from_slice(&block.length.to_be_bytes());
        }
        Item::Ram(record) => ram_record(record, out),
        Item::RamEos => out.extend_from_slice(&FLAG_EOS.to_be_bytes()),
        Item::Footer { id } => {
            out.push(VM_SECTION_FOOTER);
            out.extend_from_slice(&id.to_be_bytes());
        }
        Item::Command { cmd, data } => {
            out.push(VM_COMMAND);
            out.extend_from_slice(&cmd.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
        Item::Tail(bytes) => out.extend_from_slice(bytes),
    }
}

fn ram_record(record: &RamRecord, out: &mut Vec<u8>) {
    let kind = match record.body {
        RamBody::Page(_) => FLAG_PAGE,
        RamBody::Zero(_) => FLAG_ZERO,
        RamBody::Ref(_) => FLAG_PERFPLUS_REF,
    };
    let continues = if record.block_name.is_none() { FLAG_CONTINUE } else { 0 };
    out.extend_from_slice(&(record.offset | kind | continues).to_be_bytes());
    if let Some(name) = &record.block_name {
        short_string(name, out);
    }
    match &record.body {
        RamBody::Page(page) => out.extend_from_slice(&page[..]),
        RamBody::Zero(fill) => out.push(*fill),
        RamBody::Ref(digest) => out.extend_from_slice(digest),
    }
}

/// A name as u8 length + bytes. Names come from a parsed stream (at most 255 bytes).
fn short_string(name: &str, out: &mut Vec<u8>) {
    debug_assert!(name.len() <= u8::MAX as usize, "a stream name is at most 255 bytes");
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}
