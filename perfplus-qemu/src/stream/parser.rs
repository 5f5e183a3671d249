//! The incremental parser: bytes go in by [`Parser::feed`] in chunks of any size, [`Item`]s come out
//! of [`Parser::next_item`] as soon as they are complete.
//!
//! Bounds: an item is at most one page plus a few hundred bytes, every length is checked against its
//! limit before it is used, and the parser holds only the bytes it was fed and has not yet returned
//! (the caller feeds a chunk, then drains the items). Nothing the stream says allocates more: the
//! block list is capped at [`MAX_BLOCKS`] names of at most 255 bytes, the configuration's name at
//! [`MAX_MACHINE_NAME`], a command's data at 64 KiB (its u16 length).

use super::*;

/// The most RAM blocks a stream may list (QEMU has a dozen for a PC; each costs a name here).
pub const MAX_BLOCKS: usize = 1024;
/// The longest machine type name accepted in the configuration section.
pub const MAX_MACHINE_NAME: u32 = 256;

/// Which records the RAM section may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// As QEMU writes it: a reference record is an error.
    Qemu,
    /// As the source agent writes it for the destination agent: references allowed.
    Relay,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    /// The magic and the version.
    Header,
    /// Between sections.
    #[default]
    Top,
    /// A RAM section's start: the MEM_SIZE record comes first.
    RamMemSize { id: u32 },
    /// The block list: `remaining` bytes of RAM still to be named.
    RamBlocks { id: u32, remaining: u64 },
    /// Page records until EOS.
    RamRecords { id: u32 },
    /// After EOS: a footer, or the next section.
    AfterEos { id: u32 },
    /// Everything from the first non-iterable section on.
    Tail,
}

/// Why one parse attempt stopped.
enum Halt {
    /// Not enough bytes yet: nothing consumed, try again after the next feed.
    Short,
    Error(StreamError),
}

impl From<StreamError> for Halt {
    fn from(e: StreamError) -> Self {
        Halt::Error(e)
    }
}

/// Reads big-endian fields from the unconsumed bytes, or says they are not all there yet.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Halt> {
        let end = self.pos.checked_add(n).ok_or(Halt::Short)?;
        let slice = self.bytes.get(self.pos..end).ok_or(Halt::Short)?;
        self.pos = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, Halt> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Halt> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, Halt> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, Halt> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn peek(&self) -> Result<u8, Halt> {
        self.bytes.get(self.pos).copied().ok_or(Halt::Short)
    }
    /// A name written as u8 length + bytes (block names, section idstrs).
    fn short_string(&mut self, at: u64, what: &str) -> Result<String, Halt> {
        let len = self.u8()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| malformed(at, format!("{what} is not UTF-8")))
    }
}

fn malformed(at: u64, what: impl Into<String>) -> Halt {
    Halt::Error(StreamError::Malformed { at, what: what.into() })
}

fn unsupported(at: u64, what: impl Into<String>) -> Halt {
    Halt::Error(StreamError::Unsupported { at, what: what.into() })
}

/// The incremental parser of one stream.
pub struct Parser {
    dialect: Dialect,
    buf: Vec<u8>,
    /// Bytes of `buf` already returned as items.
    pos: usize,
    /// Offset in the stream of `buf[0]`.
    base: u64,
    state: State,
    configuration_seen: bool,
    ram_section: Option<u32>,
    blocks: Vec<RamBlock>,
    /// The block of the last page record (what CONTINUE refers to).
    last_block: Option<usize>,
}

impl Parser {
    pub fn new(dialect: Dialect) -> Parser {
        Parser {
            dialect,
            buf: Vec::new(),
            pos: 0,
            base: 0,
            state: State::Header,
            configuration_seen: false,
            ram_section: None,
            blocks: Vec::new(),
            last_block: None,
        }
    }

    /// Appends the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The RAM blocks the stream listed so far.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Whether the parser has reached the tail (device state, EOF, vmdesc).
    pub fn in_tail(&self) -> bool {
        self.state == State::Tail
    }

    /// Bytes fed but not yet returned as items.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// At the end of the input: an error unless the stream reached its tail and nothing is left over.
    pub fn finish(&self) -> Result<(), StreamError> {
        if self.state == State::Tail && self.buffered() == 0 {
            return Ok(());
        }
        Err(StreamError::Malformed {
            at: self.base + self.pos as u64,
            what: format!(
                "the stream ended early ({:?}, {} bytes of an incomplete item)",
                self.state,
                self.buffered()
            ),
        })
    }

    /// The next complete item, `None` if more bytes are needed.
    pub fn next_item(&mut self) -> Result<Option<Item>, StreamError> {
        if self.state == State::Tail {
            if self.buffered() == 0 {
                return Ok(None);
            }
            let tail = self.buf[self.pos..].to_vec();
            self.pos = self.buf.len();
            return Ok(Some(Item::Tail(tail)));
        }
        let mut cursor = Cursor {
            bytes: &self.buf[self.pos..],
            pos: 0,
        };
        let at = self.base + self.pos as u64;
        // Parse with the state as it is; commit the consumed bytes and the new state only on success.
        let mut next = Next {
            state: self.state,
            ..Next::default()
        };
        match parse(self, &mut cursor, at, &mut next) {
            Ok(item) => {
                let consumed = cursor.pos;
                self.pos += consumed;
                self.state = next.state;
                if let Some(block) = next.block {
                    self.blocks.push(block);
                }
                if let Some(last) = next.last_block {
                    self.last_block = Some(last);
                }
                if let Some(id) = next.ram_section {
                    self.ram_section = Some(id);
                }
                self.configuration_seen |= next.configuration;
                if self.state == State::Tail && matches!(item, Item::Tail(_)) {
                    // The tail's first bytes are not consumed by `parse`: return all buffered bytes.
                    return self.next_item();
                }
                Ok(Some(item))
            }
            Err(Halt::Short) => Ok(None),
            Err(Halt::Error(e)) => Err(e),
        }
    }
}

/// What a successful parse changes in the parser.
#[derive(Default)]
struct Next {
    state: State,
    block: Option<RamBlock>,
    last_block: Option<usize>,
    ram_section: Option<u32>,
    configuration: bool,
}

fn parse(p: &Parser, c: &mut Cursor, at: u64, next: &mut Next) -> Result<Item, Halt> {
    match p.state {
        State::Header => {
            let magic = c.u32()?;
            if magic != FILE_MAGIC {
                return Err(StreamError::BadMagic { found: magic }.into());
            }
            let version = c.u32()?;
            if version != FILE_VERSION {
                return Err(StreamError::BadVersion { found: version }.into());
            }
            next.state = State::Top;
            Ok(Item::Header { version })
        }
        State::Top => parse_top(p, c, at, next),
        State::RamMemSize { id } => {
            let word = c.u64()?;
            if word & FLAG_MASK != FLAG_MEM_SIZE {
                return Err(malformed(
                    at,
                    format!(
                        "RAM section {id} starts with flags {:#x}, not MEM_SIZE",
                        word & FLAG_MASK
                    ),
                ));
            }
            let total = word & !FLAG_MASK;
            next.state = if total == 0 {
                State::RamRecords { id }
            } else {
                State::RamBlocks { id, remaining: total }
            };
            Ok(Item::RamMemSize { total })
        }
        State::RamBlocks { id, remaining } => {
            let name = c.short_string(at, "a RAM block's name")?;
            let length = c.u64()?;
            if length == 0 || length > remaining {
                return Err(malformed(
                    at,
                    format!("RAM block {name:?} of {length} bytes, {remaining} bytes of RAM left to list"),
                ));
            }
            if p.blocks.len() >= MAX_BLOCKS {
                return Err(unsupported(at, format!("more than {MAX_BLOCKS} RAM blocks")));
            }
            if p.blocks.iter().any(|b| b.name == name) {
                return Err(malformed(at, format!("RAM block {name:?} listed twice")));
            }
            next.state = match remaining - length {
                0 => State::RamRecords { id },
                remaining => State::RamBlocks { id, remaining },
            };
            let block = RamBlock { name, length };
            next.block = Some(block.clone());
            Ok(Item::RamBlock(block))
        }
        State::RamRecords { id } => parse_ram_record(p, c, at, id, next),
        State::AfterEos { id } => {
            if c.peek()? == VM_SECTION_FOOTER {
                c.u8()?;
                let found = c.u32()?;
                if found != id {
                    return Err(malformed(at, format!("footer of section {found} closes section {id}")));
                }
                next.state = State::Top;
                return Ok(Item::Footer { id });
            }
            // No footer (machines older than 2.5): the next section follows directly.
            next.state = State::Top;
            parse_top(p, c, at, next)
        }
        State::Tail => unreachable!("the tail is returned without parsing"),
    }
}

fn parse_top(p: &Parser, c: &mut Cursor, at: u64, next: &mut Next) -> Result<Item, Halt> {
    let kind = c.u8()?;
    match kind {
        VM_CONFIGURATION if !p.configuration_seen && p.ram_section.is_none() => {
            let len = c.u32()?;
            if len > MAX_MACHINE_NAME {
                return Err(malformed(
                    at,
                    format!("configuration section names a machine of {len} bytes"),
                ));
            }
            let machine = String::from_utf8(c.take(len as usize)?.to_vec())
                .map_err(|_| malformed(at, "the machine type is not UTF-8"))?;
            if c.peek()? == VM_SUBSECTION {
                return Err(unsupported(
                    at,
                    "configuration subsections (sent for x-ignore-shared, validate-uuid or a non-default page size)",
                ));
            }
            next.configuration = true;
            next.state = State::Top;
            Ok(Item::Configuration { machine })
        }
        VM_SECTION_START => {
            let id = c.u32()?;
            let name = c.short_string(at, "a section name")?;
            let instance = c.u32()?;
            let version = c.u32()?;
            if name != "ram" {
                return Err(unsupported(
                    at,
                    format!("iterable section {name:?} (only RAM is; no block migration, dirty bitmaps or VFIO)"),
                ));
            }
            if p.ram_section.is_some() {
                return Err(malformed(at, "a second RAM section start"));
            }
            if version != 4 {
                return Err(unsupported(
                    at,
                    format!("RAM section version {version} (QEMU 7.2 writes 4)"),
                ));
            }
            next.ram_section = Some(id);
            next.state = State::RamMemSize { id };
            Ok(Item::SectionStart {
                id,
                name,
                instance,
                version,
            })
        }
        VM_SECTION_PART | VM_SECTION_END => {
            let id = c.u32()?;
            if p.ram_section != Some(id) {
                return Err(malformed(
                    at,
                    format!("section {id} continues, but no such iterable section started"),
                ));
            }
            next.state = State::RamRecords { id };
            Ok(if kind == VM_SECTION_PART {
                Item::SectionPart { id }
            } else {
                Item::SectionEnd { id }
            })
        }
        VM_COMMAND => {
            let cmd = c.u16()?;
            let len = c.u16()?;
            if cmd == MIG_CMD_PACKAGED {
                return Err(unsupported(
                    at,
                    "a post-copy package (MIG_CMD_PACKAGED): post-copy is not relayed",
                ));
            }
            let data = c.take(len as usize)?.to_vec();
            next.state = State::Top;
            Ok(Item::Command { cmd, data })
        }
        VM_SECTION_FULL | VM_EOF => {
            c.pos -= 1; // the tail starts with this byte: `next_item` returns it with the rest
            next.state = State::Tail;
            Ok(Item::Tail(Vec::new()))
        }
        other => Err(malformed(at, format!("unknown section type {other:#04x}"))),
    }
}

fn parse_ram_record(p: &Parser, c: &mut Cursor, at: u64, id: u32, next: &mut Next) -> Result<Item, Halt> {
    let word = c.u64()?;
    let flags = word & FLAG_MASK;
    let offset = word & !FLAG_MASK;
    if flags == FLAG_EOS {
        next.state = State::AfterEos { id };
        return Ok(Item::RamEos);
    }
    let kind = flags & !FLAG_CONTINUE;
    let allowed = kind == FLAG_PAGE || kind == FLAG_ZERO || (kind == FLAG_PERFPLUS_REF && p.dialect == Dialect::Relay);
    if !allowed {
        return Err(unsupported(
            at,
            format!("RAM record flags {flags:#x} ({})", flag_names(flags)),
        ));
    }
    let (block_name, block) = if flags & FLAG_CONTINUE != 0 {
        let block = p
            .last_block
            .ok_or_else(|| malformed(at, "a RAM record continues a block, but no block was named before"))?;
        (None, block)
    } else {
        let name = c.short_string(at, "a RAM block's name")?;
        let block = p.blocks.iter().position(|b| b.name == name).ok_or_else(|| {
            malformed(
                at,
                format!("a page of RAM block {name:?}, which the section start did not list"),
            )
        })?;
        (Some(name), block)
    };
    let length = p.blocks[block].length;
    if offset >= length {
        return Err(malformed(
            at,
            format!(
                "page at {offset:#x} is outside RAM block {:?} ({length} bytes)",
                p.blocks[block].name
            ),
        ));
    }
    let body = match kind {
        FLAG_PAGE => {
            let bytes: [u8; PAGE_SIZE] = c.take(PAGE_SIZE)?.try_into().expect("one page");
            RamBody::Page(Box::new(bytes))
        }
        FLAG_ZERO => RamBody::Zero(c.u8()?),
        _ => RamBody::Ref(c.take(16)?.try_into().expect("16 bytes")),
    };
    next.state = State::RamRecords { id };
    next.last_block = Some(block);
    Ok(Item::Ram(RamRecord {
        offset,
        block_name,
        block,
        body,
    }))
}

/// The names of RAM flags, for error messages.
fn flag_names(flags: u64) -> String {
    const NAMES: [(u64, &str); 9] = [
        (0x01, "FULL"),
        (0x02, "ZERO"),
        (0x04, "MEM_SIZE"),
        (0x08, "PAGE"),
        (0x10, "EOS"),
        (0x20, "CONTINUE"),
        (0x40, "XBZRLE: turn the xbzrle capability off"),
        (0x80, "HOOK: RDMA is not supported"),
        (0x100, "COMPRESS_PAGE: turn the compress capability off"),
    ];
    let names: Vec<&str> = NAMES.iter().filter(|(f, _)| flags & f != 0).map(|(_, n)| *n).collect();
    if names.is_empty() {
        "unknown".into()
    } else {
        names.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items_of(bytes: &[u8], dialect: Dialect) -> Result<Vec<Item>, StreamError> {
        let mut parser = Parser::new(dialect);
        parser.feed(bytes);
        let mut items = Vec::new();
        while let Some(item) = parser.next_item()? {
            items.push(item);
        }
        parser.finish()?;
        Ok(items)
    }

    /// Header, configuration and a RAM section start listing one block "pc.ram" of two pages.
    fn start() -> Vec<u8> {
        let mut out = Vec::new();
        for item in [
            Item::Header { version: 3 },
            Item::Configuration {
                machine: "pc-q35-7.2".into(),
            },
            Item::SectionStart {
                id: 2,
                name: "ram".into(),
                instance: 0,
                version: 4,
            },
            Item::RamMemSize { total: 8192 },
            Item::RamBlock(RamBlock {
                name: "pc.ram".into(),
                length: 8192,
            }),
        ] {
            write(&item, &mut out);
        }
        out
    }

    fn unsupported_or_malformed(result: Result<Vec<Item>, StreamError>) -> String {
        match result {
            Err(e @ (StreamError::Unsupported { .. } | StreamError::Malformed { .. })) => e.to_string(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn refuses_other_magic_and_versions() {
        assert_eq!(
            items_of(b"QEVX\0\0\0\x03", Dialect::Qemu),
            Err(StreamError::BadMagic { found: 0x5145_5658 })
        );
        assert_eq!(
            items_of(b"QEVM\0\0\0\x02", Dialect::Qemu),
            Err(StreamError::BadVersion { found: 2 })
        );
    }

    #[test]
    fn a_huge_configuration_length_is_refused_before_any_buffer() {
        let mut bytes = b"QEVM\0\0\0\x03\x07".to_vec();
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(unsupported_or_malformed(items_of(&bytes, Dialect::Qemu)).contains("4294967295 bytes"));
    }

    #[test]
    fn page_records_must_name_a_listed_block_and_stay_inside_it() {
        let mut bytes = start();
        bytes.extend_from_slice(&(FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
        assert!(unsupported_or_malformed(items_of(&bytes, Dialect::Qemu)).contains("no block was named"));

        let mut bytes = start();
        bytes.extend_from_slice(&FLAG_ZERO.to_be_bytes());
        bytes.extend_from_slice(b"\x06pc.rom\0");
        assert!(unsupported_or_malformed(items_of(&bytes, Dialect::Qemu)).contains("did not list"));

        let mut bytes = start();
        bytes.extend_from_slice(&(8192 | FLAG_ZERO).to_be_bytes());
        bytes.extend_from_slice(b"\x06pc.ram\0");
        assert!(unsupported_or_malformed(items_of(&bytes, Dialect::Qemu)).contains("outside RAM block"));
    }

    #[test]
    fn xbzrle_compression_and_references_from_qemu_are_refused() {
        for (flags, says) in [(0x40, "xbzrle"), (0x100, "compress"), (FLAG_PERFPLUS_REF, "unknown")] {
            let mut bytes = start();
            bytes.extend_from_slice(&flags.to_be_bytes());
            assert!(
                unsupported_or_malformed(items_of(&bytes, Dialect::Qemu)).contains(says),
                "{flags:#x}"
            );
        }
    }

    #[test]
    fn other_iterable_sections_and_postcopy_packages_are_refused() {
        let mut bytes = b"QEVM\0\0\0\x03".to_vec();
        write(
            &Item::SectionStart {
                id: 3,
                name: "block".into(),
                instance: 0,
                version: 1,
            },
            &mut bytes,
        );
        assert!(unsupported_or_malformed(items_of(&bytes, Dialect::Qemu)).contains("\"block\""));
        let mut bytes = b"QEVM\0\0\0\x03\x08\0\x07\0\x04\0\0\0\0".to_vec();
        bytes.push(0);
        assert!(unsupported_or_malformed(items_of(&bytes, Dialect::Qemu)).contains("post-copy"));
    }

    #[test]
    fn a_stream_cut_short_is_an_error() {
        let mut bytes = start();
        bytes.extend_from_slice(&FLAG_PAGE.to_be_bytes());
        bytes.extend_from_slice(b"\x06pc.ram");
        bytes.extend_from_slice(&[1; 100]);
        assert!(unsupported_or_malformed(items_of(&bytes, Dialect::Qemu)).contains("ended early"));
    }
}
