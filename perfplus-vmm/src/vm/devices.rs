//! Port-I/O devices: a 16550 UART at COM1 (0x3f8–0x3ff) feeding the console, and a CMOS RTC
//! (0x70/0x71) that reports the host's UTC time in BCD. Every other port reads as 0xff and ignores
//! writes (each such port is logged once, at debug level).
//!
//! The devices have no interrupts (the VM has no interrupt controller; the guest polls). Their
//! migratable registers are in [`DeviceState`], which [`Devices::save`] / [`Devices::restore`] move.
use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::console::{self, Admit, LogBudget};

/// First port of the COM1 UART.
pub const COM1: u16 = 0x3f8;
/// CMOS index register port.
pub const CMOS_INDEX: u16 = 0x70;
/// CMOS data port.
pub const CMOS_DATA: u16 = 0x71;

/// How many bytes of console output the VMM keeps for [`Devices::console_tail`].
const CONSOLE_KEEP: usize = 64 * 1024;
/// Longest line forwarded to `tracing` before it is cut (before escaping).
const LINE_MAX: usize = 1024;

const LCR_DLAB: u8 = 0x80;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TX_IDLE: u8 = 0x40;
const MCR_LOOP: u8 = 0x10;

/// The 16550's software-visible registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub fcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
}

/// Device registers that move with a migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialState,
    /// Last value written to the CMOS index port (0x70), NMI-disable bit included.
    pub cmos_index: u8,
    /// The 128 bytes of CMOS RAM (time registers are computed on read and not taken from here).
    pub cmos_ram: Vec<u8>,
}

/// Console output read by position ([`Devices::console_since`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleChunk {
    /// The bytes from the position asked for (or from the oldest kept) to the newest.
    pub bytes: Vec<u8>,
    /// Bytes between the position asked for and the first of `bytes` that are no longer kept.
    pub lost: u64,
    /// The position after the last of `bytes`: ask from there next time.
    pub next: u64,
}

/// The VM's devices, behind one lock held by the vCPU thread for each I/O exit.
pub struct Devices {
    vm_name: String,
    state: DeviceState,
    console: VecDeque<u8>,
    /// Bytes the guest ever wrote to the console (the position after `console`'s last byte).
    console_written: u64,
    line: Vec<u8>,
    /// Bounds what the guest's console puts into the agent's log ([`console::LOG_BYTES_PER_SEC`]).
    log_budget: LogBudget,
    unknown_ports: HashSet<u16>,
}

impl Devices {
    pub fn new(vm_name: &str) -> Self {
        let mut cmos_ram = vec![0u8; 128];
        cmos_ram[0x0a] = 0x26; // status A: 32.768 kHz base, 1024 Hz rate, UIP clear.
        cmos_ram[0x0b] = 0x02; // status B: 24-hour mode, BCD, no interrupts.
        cmos_ram[0x0d] = 0x80; // status D: RTC valid (battery good).
        Self {
            vm_name: vm_name.to_owned(),
            state: DeviceState {
                cmos_ram,
                ..Default::default()
            },
            console: VecDeque::with_capacity(CONSOLE_KEEP),
            console_written: 0,
            line: Vec::new(),
            log_budget: LogBudget::new(
                console::LOG_BYTES_PER_SEC,
                console::LOG_BURST_BYTES,
                std::time::Instant::now(),
            ),
            unknown_ports: HashSet::new(),
        }
    }

    /// An `IN` from `port`: fills `data` (one byte access per byte of `data`).
    pub fn io_in(&mut self, port: u16, data: &mut [u8]) {
        for byte in data.iter_mut() {
            *byte = match port {
                COM1..=0x3ff => self.serial_read((port - COM1) as u8),
                CMOS_INDEX => self.state.cmos_index,
                CMOS_DATA => self.cmos_read(),
                _ => {
                    self.note_unknown(port, "read");
                    0xff
                }
            };
        }
    }

    /// An `OUT` to `port` of `data` (one byte access per byte of `data`).
    pub fn io_out(&mut self, port: u16, data: &[u8]) {
        for &byte in data {
            match port {
                COM1..=0x3ff => self.serial_write((port - COM1) as u8, byte),
                CMOS_INDEX => self.state.cmos_index = byte,
                CMOS_DATA => {
                    let index = (self.state.cmos_index & 0x7f) as usize;
                    // Time and status C/D registers are not writable; everything else is RAM.
                    if !matches!(index, 0x00..=0x09 | 0x0c | 0x0d | 0x32) {
                        self.state.cmos_ram[index] = byte;
                    }
                }
                _ => self.note_unknown(port, "write"),
            }
        }
    }

    fn note_unknown(&mut self, port: u16, what: &str) {
        if self.unknown_ports.insert(port) {
            tracing::debug!(vm = %self.vm_name, "guest {what} of unmodelled port {port:#x} (reads 0xff, writes ignored)");
        }
    }

    fn serial_read(&mut self, offset: u8) -> u8 {
        let s = &self.state.serial;
        let dlab = s.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => s.dll,
            0 => 0, // RBR: no input ever arrives.
            1 if dlab => s.dlm,
            1 => s.ier,
            // IIR: no interrupt pending; FIFO-enabled bits when the FIFO is on.
            2 => 0x01 | if s.fcr & 1 != 0 { 0xc0 } else { 0 },
            3 => s.lcr,
            4 => s.mcr,
            5 => LSR_THR_EMPTY | LSR_TX_IDLE,
            // MSR: in loopback the outputs feed the inputs, otherwise DCD, DSR and CTS are asserted.
            6 if s.mcr & MCR_LOOP != 0 => (s.mcr & 0x0f) << 4,
            6 => 0xb0,
            _ => s.scr,
        }
    }

    fn serial_write(&mut self, offset: u8, value: u8) {
        let dlab = self.state.serial.lcr & LCR_DLAB != 0;
        let s = &mut self.state.serial;
        match offset {
            0 if dlab => s.dll = value,
            0 if s.mcr & MCR_LOOP != 0 => {} // loopback: the byte does not leave the UART.
            0 => self.console_byte(value),
            1 if dlab => s.dlm = value,
            1 => s.ier = value & 0x0f,
            2 => s.fcr = value & 0xc9,
            3 => s.lcr = value,
            4 => s.mcr = value & 0x1f,
            5 | 6 => {} // LSR/MSR are read-only.
            _ => s.scr = value,
        }
    }

    fn console_byte(&mut self, byte: u8) {
        if self.console.len() == CONSOLE_KEEP {
            self.console.pop_front();
        }
        self.console.push_back(byte);
        self.console_written += 1;
        match byte {
            b'\n' => self.flush_line(),
            b'\r' => {}
            _ => {
                self.line.push(byte);
                if self.line.len() >= LINE_MAX {
                    self.flush_line();
                }
            }
        }
    }

    /// Logs the line (escaped: the guest cannot act on a terminal or forge log lines) within the
    /// VM's log budget; a line over the budget is dropped and counted, and the log says so once when
    /// dropping begins and with the counts before the next line it logs.
    fn flush_line(&mut self) {
        let line = console::escape(&self.line);
        self.line.clear();
        match self.log_budget.admit(line.len(), std::time::Instant::now()) {
            Admit::Log { dropped } => {
                if let Some(d) = dropped {
                    tracing::warn!(
                        vm = %self.vm_name,
                        "guest console: {} lines ({} bytes) not logged over the last {:.1} s (limit {} bytes/s per VM)",
                        d.lines,
                        d.bytes,
                        d.over.as_secs_f64(),
                        console::LOG_BYTES_PER_SEC
                    );
                }
                tracing::info!(vm = %self.vm_name, "guest: {line}");
            }
            Admit::Drop { first: true } => tracing::warn!(
                vm = %self.vm_name,
                "guest console: output over the log limit of {} bytes/s per VM; lines are dropped from the log \
                 (counted, and kept in the console tail of `vm status`)",
                console::LOG_BYTES_PER_SEC
            ),
            Admit::Drop { first: false } => {}
        }
    }

    /// Console lines and bytes not logged since the VM started (over the log budget).
    pub fn console_dropped(&self) -> console::Dropped {
        self.log_budget.total_dropped
    }

    /// The last (up to 64 KiB of) console output, one line per line, each escaped (see
    /// [`console::escape`]; a CR before a line's end is dropped).
    pub fn console_tail(&self) -> String {
        let (a, b) = self.console.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        let lines: Vec<String> = bytes
            .split(|&c| c == b'\n')
            .map(|line| console::escape(line.strip_suffix(b"\r").unwrap_or(line)))
            .collect();
        lines.join("\n")
    }

    /// The console output from position `from` on (positions count the bytes the guest wrote since
    /// this VM was created), as far as it is still kept (the last 64 KiB).
    pub fn console_since(&self, from: u64) -> ConsoleChunk {
        let kept_from = self.console_written - self.console.len() as u64;
        let start = from.clamp(kept_from, self.console_written);
        let skip = (start - kept_from) as usize;
        ConsoleChunk {
            bytes: self.console.range(skip..).copied().collect(),
            lost: start - from.min(start),
            next: self.console_written,
        }
    }

    fn cmos_read(&self) -> u8 {
        let index = self.state.cmos_index & 0x7f;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let t = UtcTime::from_unix(now);
        match index {
            0x00 => bcd(t.second),
            0x02 => bcd(t.minute),
            0x04 => bcd(t.hour),
            0x06 => bcd(t.weekday),
            0x07 => bcd(t.day),
            0x08 => bcd(t.month),
            0x09 => bcd((t.year % 100) as u8),
            0x32 => bcd((t.year / 100) as u8),
            0x0c => 0, // status C: no interrupt flags.
            0x0d => 0x80,
            i => self.state.cmos_ram[i as usize],
        }
    }

    /// The registers to migrate.
    pub fn save(&self) -> DeviceState {
        self.state.clone()
    }

    /// Loads registers saved by [`Devices::save`].
    pub fn restore(&mut self, state: &DeviceState) -> anyhow::Result<()> {
        anyhow::ensure!(
            state.cmos_ram.len() == 128,
            "device state has {} bytes of CMOS RAM, expected 128",
            state.cmos_ram.len()
        );
        self.state = state.clone();
        Ok(())
    }
}

fn bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// A UTC calendar time, for the RTC.
#[derive(Debug, PartialEq, Eq)]
struct UtcTime {
    year: u32,
    month: u8,
    day: u8,
    /// 1 = Sunday … 7 = Saturday, as the MC146818 counts.
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl UtcTime {
    fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Howard Hinnant's civil_from_days.
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        Self {
            year,
            month,
            day,
            // 1970-01-01 was a Thursday (5 in 1..=7 with Sunday = 1).
            weekday: ((days + 4) % 7 + 1) as u8,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_read_by_position_and_says_what_it_no_longer_keeps() {
        let mut d = Devices::new("t");
        d.io_out(COM1, b"hi\n");
        let all = d.console_since(0);
        assert_eq!((all.bytes.as_slice(), all.lost, all.next), (&b"hi\n"[..], 0, 3));
        let rest = d.console_since(1);
        assert_eq!((rest.bytes.as_slice(), rest.lost, rest.next), (&b"i\n"[..], 0, 3));
        assert!(d.console_since(3).bytes.is_empty());
        // 100 bytes more than it keeps after position 3: a reader at 3 lost those 100.
        for i in 0..CONSOLE_KEEP + 100 {
            d.io_out(COM1, &[b'a' + (i % 26) as u8]);
        }
        let behind = d.console_since(3);
        assert_eq!(behind.lost, 100);
        assert_eq!(behind.bytes.len(), CONSOLE_KEEP);
        assert_eq!(behind.next, 3 + CONSOLE_KEEP as u64 + 100);
        assert_eq!(behind.bytes[CONSOLE_KEEP - 1], b'a' + ((CONSOLE_KEEP + 99) % 26) as u8);
    }

    #[test]
    fn uart_honours_dlab_and_reports_thr_empty() {
        let mut d = Devices::new("t");
        d.io_out(COM1 + 3, &[0x80]); // DLAB on
        d.io_out(COM1, &[0x01]); // divisor low: not data
        d.io_out(COM1 + 1, &[0x00]);
        d.io_out(COM1 + 3, &[0x03]); // 8N1, DLAB off
        d.io_out(COM1, b"hi\n");
        assert_eq!(d.console_tail(), "hi\n");
        let mut b = [0u8];
        d.io_in(COM1 + 5, &mut b);
        assert_eq!(b[0] & LSR_THR_EMPTY, LSR_THR_EMPTY);
        d.io_out(COM1 + 3, &[0x83]);
        d.io_in(COM1, &mut b);
        assert_eq!(b[0], 0x01);
        assert_eq!(d.save().serial.dll, 1);
    }

    #[test]
    fn unknown_ports_read_ff() {
        let mut d = Devices::new("t");
        let mut b = [0u8; 2];
        d.io_in(0x60, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        d.io_out(0x80, &[1]);
    }

    #[test]
    fn rtc_is_bcd_and_sane() {
        let mut d = Devices::new("t");
        let mut read = |index: u8| {
            d.io_out(CMOS_INDEX, &[index]);
            let mut b = [0u8];
            d.io_in(CMOS_DATA, &mut b);
            b[0]
        };
        assert_eq!(read(0x0b), 0x02);
        assert_eq!(read(0x0a) & 0x80, 0);
        let month = read(0x08);
        assert!((0x01..=0x12).contains(&month) && month & 0x0f <= 9);
        assert!(read(0x32) >= 0x20);
    }

    #[test]
    fn civil_dates() {
        let t = UtcTime::from_unix(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 5));
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let t = UtcTime::from_unix(1_709_210_096);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2024, 2, 29, 12, 34, 56, 5)
        );
    }

    #[test]
    fn state_round_trips() {
        let mut d = Devices::new("t");
        d.io_out(COM1 + 7, &[0x42]);
        d.io_out(CMOS_INDEX, &[0x8f]);
        d.io_out(CMOS_DATA, &[0x33]);
        let state = d.save();
        let mut e = Devices::new("u");
        e.restore(&state).unwrap();
        assert_eq!(e.save(), state);
        assert_eq!(state.cmos_ram[0x0f], 0x33);
    }
}
