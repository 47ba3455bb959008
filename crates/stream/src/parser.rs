//! The incremental parser of the main channel.

use std::mem;

use crate::{
    flags, BlockName, Event, PageRecord, RamSectionSummary, RecordHeader, SectionKind, StreamError, ZeroRecord,
    FILE_MAGIC, FILE_VERSION, MAX_BLOCKS, MAX_CAPABILITIES, MAX_HELD, MAX_MACHINE_NAME, PAGE_BITS, PAGE_SIZE,
};

const EOF: u8 = 0x00;
const SUBSECTION: u8 = 0x05;
const VMDESCRIPTION: u8 = 0x06;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const SECTION_FOOTER: u8 = 0x7e;

const CMD_OPEN_RETURN_PATH: u16 = 1;
const CMD_PING: u16 = 2;
const CMD_POSTCOPY_ADVISE: u16 = 3;
const CMD_SWITCHOVER_START: u16 = 11;

/// Version of the `ram` section (`register_savevm_live("ram", 0, 4, …)`).
const RAM_VERSION: u32 = 4;
/// Opaque bytes gathered from parsed items are handed out at least this often.
const OPAQUE_FLUSH: usize = 64 * 1024;

/// Facts of the configuration section (`vmstate_configuration` in `savevm.c`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamConfig {
    /// The stream had a configuration section (QEMU's `send-configuration`, on by default).
    pub present: bool,
    /// The machine type's name, e.g. `pc-q35-10.0` (non-UTF-8 bytes replaced).
    pub machine: Option<String>,
    /// `configuration/target-page-bits`, if sent (only when the target's page bits exceed its
    /// minimum; never on x86_64).
    pub target_page_bits: Option<u32>,
    /// `configuration/capabilities`: the validated capabilities that are on (`x-ignore-shared`,
    /// `mapped-ram`).
    pub capabilities: Vec<String>,
    /// `configuration/uuid`, if sent (`validate-uuid`).
    pub uuid: Option<[u8; 16]>,
}

impl StreamConfig {
    /// Whether `x-ignore-shared` is on: every MEM_SIZE entry then carries the block's address.
    pub fn x_ignore_shared(&self) -> bool {
        self.capabilities.iter().any(|c| c == "x-ignore-shared")
    }
}

/// One entry of the MEM_SIZE block list of the `ram` START section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    /// The block's id string.
    pub name: BlockName,
    /// Its `used_length` in bytes.
    pub used_length: u64,
    /// Its guest-physical address (`mr->addr`), sent only with `x-ignore-shared`.
    pub addr: Option<u64>,
}

/// Counts of what the parser saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes fed.
    pub bytes_in: u64,
    /// Bytes handed out as [`Event::Opaque`].
    pub opaque_bytes: u64,
    /// Bytes handed out as PAGE and ZERO records.
    pub record_bytes: u64,
    /// PAGE records.
    pub pages: u64,
    /// ZERO records.
    pub zeros: u64,
    /// `ram` sections completed (EOS and footer parsed).
    pub ram_sections: u64,
    /// Commands parsed.
    pub commands: u64,
}

/// Where the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the file header and configuration, before the `ram` START.
    Setup,
    /// Between or inside `ram` sections.
    Ram,
    /// The `ram` END was parsed; everything is opaque.
    RamDone,
    /// The parser gave up; everything is opaque.
    Fallback,
    /// [`Parser::finish`] was called.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting magic and version.
    Header,
    /// After the header: the configuration section may follow.
    AfterHeader,
    /// After the configuration body: subsections may follow.
    AfterConfig,
    /// Between top-level items.
    Top,
    /// Inside a `ram` section, expecting a record.
    Ram(SectionKind),
    /// Inside the MEM_SIZE block list; this many bytes of blocks still to come.
    Blocks(SectionKind, u64),
    /// After a `ram` section's EOS: the footer.
    Footer(SectionKind),
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Header => "the file header",
            State::AfterHeader | State::AfterConfig | State::Top => "a top-level item",
            State::Ram(_) => "a ram section",
            State::Blocks(..) => "the ram block list",
            State::Footer(_) => "a ram section's footer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Parse(State),
    RamDone,
    Fallback,
    Finished,
}

/// What one parse step did with the bytes at the front of its input.
#[derive(Debug)]
enum Step {
    /// The item is incomplete.
    More,
    /// `n` bytes are opaque; the events follow them.
    Opaque(usize, Vec<Event>),
    /// `n` bytes are the record `Event`.
    Record(usize, Event),
    /// Not understood; nothing consumed.
    Fallback(String),
}

/// A cursor over the bytes of one item; `None` = the item goes past the end.
struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|s| s[0])
    }
    fn be16(&mut self) -> Option<u16> {
        self.bytes(2).and_then(|s| s.try_into().ok()).map(u16::from_be_bytes)
    }
    fn be32(&mut self) -> Option<u32> {
        self.bytes(4).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes)
    }
    fn be64(&mut self) -> Option<u64> {
        self.bytes(8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes)
    }
    /// A u8 length and that many bytes.
    fn name(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.bytes(usize::from(n))
    }
}

macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Step::More,
        }
    };
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe_flags(f: u64) -> String {
    let base = f & !flags::CONTINUE;
    let what = match base {
        flags::XBZRLE => "an XBZRLE page (xbzrle is on)",
        flags::HOOK => "an RDMA hook record",
        flags::COMPRESS_PAGE => "a compressed page (compress is on)",
        flags::MULTIFD_FLUSH => "a MULTIFD_FLUSH record (multifd is on)",
        flags::FULL => "an obsolete FULL record",
        flags::MEM_SIZE => "a MEM_SIZE record outside the start of the ram START section",
        flags::EOS => "an EOS record with CONTINUE",
        _ => "a record of unknown flags",
    };
    format!("{what} (flags {f:#05x})")
}

/// Incremental parser of QEMU's main migration channel. Feed it the bytes as they arrive, in
/// chunks of any size: the events are the same whatever the chunking, apart from how opaque
/// bytes are split. Writing the events back gives the bytes fed, exactly; at most [`MAX_HELD`]
/// bytes of an incomplete item are held back until the rest of it arrives (none once the
/// stream is opaque).
#[derive(Debug)]
pub struct Parser {
    mode: Mode,
    /// Bytes of an incomplete item.
    held: Vec<u8>,
    /// Opaque bytes of parsed items, not handed out yet.
    pending: Vec<u8>,
    config: StreamConfig,
    ram_id: Option<u32>,
    ram_total: Option<u64>,
    blocks: Vec<RamBlockInfo>,
    /// Index in `blocks` of the block of the last PAGE/ZERO record (`last_recv_block`).
    cur_block: Option<usize>,
    section_pages: u64,
    section_zeros: u64,
    return_path: bool,
    switchover_started: bool,
    fallback_reason: Option<String>,
    stats: Stats,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self {
            mode: Mode::Parse(State::Header),
            held: Vec::new(),
            pending: Vec::new(),
            config: StreamConfig::default(),
            ram_id: None,
            ram_total: None,
            blocks: Vec::new(),
            cur_block: None,
            section_pages: 0,
            section_zeros: 0,
            return_path: false,
            switchover_started: false,
            fallback_reason: None,
            stats: Stats::default(),
        }
    }

    /// The configuration section's facts (complete once [`Phase::Ram`] is reached).
    pub fn config(&self) -> &StreamConfig {
        &self.config
    }

    /// The MEM_SIZE block list of the `ram` START section.
    pub fn blocks(&self) -> &[RamBlockInfo] {
        &self.blocks
    }

    /// The total RAM size announced by MEM_SIZE (ignored blocks included).
    pub fn ram_total(&self) -> Option<u64> {
        self.ram_total
    }

    /// The `ram` section's id, once its START was parsed.
    pub fn ram_section_id(&self) -> Option<u32> {
        self.ram_id
    }

    /// Whether `MIG_CMD_OPEN_RETURN_PATH` was seen: the destination will answer on the same
    /// connection.
    pub fn return_path_opened(&self) -> bool {
        self.return_path
    }

    /// Whether `MIG_CMD_SWITCHOVER_START` was seen.
    pub fn switchover_started(&self) -> bool {
        self.switchover_started
    }

    /// Why the parser fell back, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Counts so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Bytes of an incomplete item held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Where the parser is.
    pub fn phase(&self) -> Phase {
        match self.mode {
            Mode::Parse(State::Header | State::AfterHeader | State::AfterConfig) => Phase::Setup,
            Mode::Parse(State::Top) if self.ram_id.is_none() => Phase::Setup,
            Mode::Parse(_) => Phase::Ram,
            Mode::RamDone => Phase::RamDone,
            Mode::Fallback => Phase::Fallback,
            Mode::Finished => Phase::Finished,
        }
    }

    /// Feeds the next bytes of the stream; events go to `out`, in stream order. Everything
    /// fed is handed out by the time this returns, except an incomplete item.
    pub fn feed(&mut self, mut input: &[u8], out: &mut impl FnMut(Event)) {
        self.stats.bytes_in += input.len() as u64;
        loop {
            let Mode::Parse(_) = self.mode else {
                // Opaque from here on: hand out whatever arrives.
                let held = mem::take(&mut self.held);
                self.pending.extend_from_slice(&held);
                self.flush(out);
                if !input.is_empty() {
                    self.emit_opaque(input.to_vec(), out);
                }
                return;
            };
            if input.is_empty() {
                break;
            }
            if self.held.is_empty() {
                match self.step(input) {
                    Step::More => {
                        if input.len() >= MAX_HELD {
                            self.fall_back(format!("an item longer than {MAX_HELD} bytes"), out);
                            continue;
                        }
                        self.held.extend_from_slice(input);
                        break;
                    }
                    Step::Fallback(reason) => self.fall_back(reason, out),
                    step => {
                        let n = self.apply(step, input, out);
                        input = &input[n..];
                    }
                }
            } else {
                let old = self.held.len();
                let take = input.len().min(MAX_HELD.saturating_sub(old));
                let mut buf = mem::take(&mut self.held);
                buf.extend_from_slice(&input[..take]);
                match self.step(&buf) {
                    Step::More => {
                        if buf.len() >= MAX_HELD {
                            buf.truncate(old);
                            self.held = buf;
                            self.fall_back(format!("an item longer than {MAX_HELD} bytes"), out);
                            continue;
                        }
                        // take == input.len(): all of it is held now.
                        self.held = buf;
                        break;
                    }
                    Step::Fallback(reason) => {
                        buf.truncate(old);
                        self.held = buf;
                        self.fall_back(reason, out);
                    }
                    step => {
                        let n = self.apply(step, &buf, out);
                        if n >= old {
                            input = &input[n - old..];
                        } else {
                            // The item ended inside the held bytes: keep their rest, and the
                            // input as it was.
                            self.held = buf[n..old].to_vec();
                        }
                    }
                }
            }
        }
        self.flush(out);
    }

    /// [`Parser::feed`] collecting the events.
    pub fn feed_vec(&mut self, input: &[u8]) -> Vec<Event> {
        let mut v = Vec::new();
        self.feed(input, &mut |e| v.push(e));
        v
    }

    /// The stream ended. Hands out the bytes of an incomplete item as opaque (so the rebuild is
    /// still the whole input) and says whether the stream ended at a clean boundary: in pass-
    /// through (after the RAM END or a fallback), or between top-level items. Ending before
    /// the header, inside an item or inside a `ram` section is [`StreamError::Truncated`].
    pub fn finish(&mut self, out: &mut impl FnMut(Event)) -> Result<(), StreamError> {
        let mode = mem::replace(&mut self.mode, Mode::Finished);
        let held = mem::take(&mut self.held);
        let n = held.len();
        self.pending.extend_from_slice(&held);
        self.flush(out);
        match mode {
            Mode::Parse(State::Top | State::AfterHeader | State::AfterConfig) if n == 0 => Ok(()),
            Mode::Parse(s) => Err(StreamError::Truncated { state: s.name(), held: n }),
            Mode::RamDone | Mode::Fallback | Mode::Finished => Ok(()),
        }
    }

    fn emit_opaque(&mut self, bytes: Vec<u8>, out: &mut impl FnMut(Event)) {
        self.stats.opaque_bytes += bytes.len() as u64;
        out(Event::Opaque(bytes));
    }

    fn flush(&mut self, out: &mut impl FnMut(Event)) {
        if !self.pending.is_empty() {
            let b = mem::take(&mut self.pending);
            self.emit_opaque(b, out);
        }
    }

    /// Gives up: the held bytes and everything after are opaque.
    fn fall_back(&mut self, reason: String, out: &mut impl FnMut(Event)) {
        self.flush(out);
        self.fallback_reason = Some(reason.clone());
        self.mode = Mode::Fallback;
        out(Event::Fallback { reason });
    }

    /// Hands out a completed step; returns the bytes it used.
    fn apply(&mut self, step: Step, data: &[u8], out: &mut impl FnMut(Event)) -> usize {
        match step {
            Step::Opaque(n, then) => {
                self.pending.extend_from_slice(&data[..n]);
                if !then.is_empty() || self.pending.len() >= OPAQUE_FLUSH {
                    self.flush(out);
                }
                for e in then {
                    out(e);
                }
                n
            }
            Step::Record(n, ev) => {
                self.flush(out);
                self.stats.record_bytes += n as u64;
                out(ev);
                n
            }
            Step::More | Step::Fallback(_) => 0,
        }
    }

    /// Parses one item at the front of `d`. Nothing in `self` changes unless the item is
    /// complete (or falls back).
    fn step(&mut self, d: &[u8]) -> Step {
        let Mode::Parse(state) = self.mode else { return Step::Fallback("not parsing".into()) };
        let mut c = Cur { b: d, pos: 0 };
        match state {
            State::Header => {
                let magic = need!(c.be32());
                let version = need!(c.be32());
                if magic != FILE_MAGIC {
                    return Step::Fallback(format!("not a QEMU migration stream (magic {magic:#010x})"));
                }
                if version != FILE_VERSION {
                    return Step::Fallback(format!("stream version {version}, expected {FILE_VERSION}"));
                }
                self.mode = Mode::Parse(State::AfterHeader);
                Step::Opaque(c.pos, Vec::new())
            }
            State::AfterHeader | State::AfterConfig | State::Top => {
                let t = need!(c.u8());
                match t {
                    CONFIGURATION if state == State::AfterHeader => {
                        let len = need!(c.be32());
                        if len > MAX_MACHINE_NAME {
                            return Step::Fallback(format!("a machine type name of {len} bytes"));
                        }
                        let name = need!(c.bytes(len as usize));
                        self.config.present = true;
                        self.config.machine = Some(lossy(name));
                        self.mode = Mode::Parse(State::AfterConfig);
                        Step::Opaque(c.pos, Vec::new())
                    }
                    SUBSECTION if state == State::AfterConfig => self.subsection(c),
                    COMMAND => self.command(c),
                    _ => {
                        if let Some(kind) = SectionKind::from_byte(t) {
                            return self.section(c, kind);
                        }
                        let what = match t {
                            EOF => "EOF".to_string(),
                            VMDESCRIPTION => "the vmdesc".to_string(),
                            CONFIGURATION => "a configuration section after the start".to_string(),
                            SUBSECTION => "a subsection outside the configuration".to_string(),
                            _ => format!("an unknown top-level byte {t:#04x}"),
                        };
                        Step::Fallback(format!("{what} before the ram section's END"))
                    }
                }
            }
            State::Ram(kind) => self.ram_record(c, kind),
            State::Blocks(kind, remaining) => self.block_entry(c, kind, remaining),
            State::Footer(kind) => {
                let b = need!(c.u8());
                if b != SECTION_FOOTER {
                    return Step::Fallback(format!("byte {b:#04x} instead of the footer after a ram section's EOS"));
                }
                let id = need!(c.be32());
                let ram_id = self.ram_id.unwrap_or(0);
                if id != ram_id {
                    return Step::Fallback(format!("footer of section {id} closing ram section {ram_id}"));
                }
                let summary = RamSectionSummary {
                    kind,
                    section_id: ram_id,
                    pages: mem::take(&mut self.section_pages),
                    zeros: mem::take(&mut self.section_zeros),
                };
                self.stats.ram_sections += 1;
                let mut then = vec![Event::RamSectionEnd(summary)];
                if kind == SectionKind::End {
                    self.mode = Mode::RamDone;
                    then.push(Event::RamDone);
                } else {
                    self.mode = Mode::Parse(State::Top);
                }
                Step::Opaque(c.pos, then)
            }
        }
    }

    /// A configuration subsection (after its 0x05): u8 namelen, name, be32 version_id, fields.
    fn subsection(&mut self, mut c: Cur<'_>) -> Step {
        let name = need!(c.name());
        let version = need!(c.be32());
        let known =
            matches!(name, b"configuration/target-page-bits" | b"configuration/capabilities" | b"configuration/uuid");
        if !known {
            return Step::Fallback(format!("unknown configuration subsection {:?}", lossy(name)));
        }
        if version != 1 {
            return Step::Fallback(format!("configuration subsection {:?} of version {version}", lossy(name)));
        }
        match name {
            b"configuration/target-page-bits" => {
                let bits = need!(c.be32());
                self.config.target_page_bits = Some(bits);
                if bits != PAGE_BITS {
                    return Step::Fallback(format!("target page bits {bits}, only {PAGE_BITS} is parsed"));
                }
            }
            b"configuration/capabilities" => {
                let count = need!(c.be32());
                if count > MAX_CAPABILITIES {
                    return Step::Fallback(format!("{count} capabilities in the configuration"));
                }
                let mut caps = Vec::new();
                for _ in 0..count {
                    caps.push(lossy(need!(c.name())));
                }
                let other = caps.iter().find(|c| c.as_str() != "x-ignore-shared").cloned();
                self.config.capabilities = caps;
                if let Some(cap) = other {
                    return Step::Fallback(format!("capability {cap:?} (it changes the ram section's format)"));
                }
            }
            _ => {
                let uuid = need!(c.bytes(16));
                let mut u = [0u8; 16];
                u.copy_from_slice(uuid);
                self.config.uuid = Some(u);
            }
        }
        Step::Opaque(c.pos, Vec::new())
    }

    /// A command (after its 0x08): be16 cmd, be16 len, len bytes.
    fn command(&mut self, mut c: Cur<'_>) -> Step {
        let cmd = need!(c.be16());
        let len = need!(c.be16());
        let then = match (cmd, len) {
            (CMD_OPEN_RETURN_PATH, 0) => Vec::new(),
            (CMD_PING, 4) => {
                need!(c.bytes(4));
                Vec::new()
            }
            (CMD_SWITCHOVER_START, 0) => vec![Event::SwitchoverStart],
            // Without a payload postcopy-ram is off (`qemu_savevm_send_postcopy_advise`): QEMU
            // advises for another capability (`dirty-bitmaps`), whose sections fall back anyway.
            (CMD_POSTCOPY_ADVISE, 0) => Vec::new(),
            (CMD_POSTCOPY_ADVISE, _) => {
                return Step::Fallback(format!("POSTCOPY_ADVISE of {len} bytes: postcopy-ram is on"));
            }
            _ => return Step::Fallback(format!("command {cmd} of {len} bytes")),
        };
        self.stats.commands += 1;
        if cmd == CMD_OPEN_RETURN_PATH {
            self.return_path = true;
        }
        if cmd == CMD_SWITCHOVER_START {
            self.switchover_started = true;
        }
        self.mode = Mode::Parse(State::Top);
        Step::Opaque(c.pos, then)
    }

    /// A section header (after its type byte): be32 id, and for START/FULL u8 idlen, idstr,
    /// be32 instance_id, be32 version_id.
    fn section(&mut self, mut c: Cur<'_>, kind: SectionKind) -> Step {
        let id = need!(c.be32());
        match kind {
            SectionKind::Start | SectionKind::Full => {
                let idstr = need!(c.name());
                let instance = need!(c.be32());
                let version = need!(c.be32());
                if kind == SectionKind::Full || idstr != b"ram" {
                    return Step::Fallback(format!(
                        "{} section {:?} (id {id}) before the ram section's END",
                        kind.name(),
                        lossy(idstr)
                    ));
                }
                if self.ram_id.is_some() {
                    return Step::Fallback(format!("a second ram START section (id {id})"));
                }
                if instance != 0 || version != RAM_VERSION {
                    return Step::Fallback(format!("ram section instance {instance} version {version}"));
                }
                self.ram_id = Some(id);
            }
            SectionKind::Part | SectionKind::End => {
                if self.ram_id != Some(id) {
                    return Step::Fallback(format!("{} of section {id} before the ram section's END", kind.name()));
                }
            }
        }
        self.section_pages = 0;
        self.section_zeros = 0;
        self.mode = Mode::Parse(State::Ram(kind));
        Step::Opaque(c.pos, vec![Event::RamSectionStart { kind, section_id: id }])
    }

    /// One record of the `ram` section: be64 (offset | flags), then its payload.
    fn ram_record(&mut self, mut c: Cur<'_>, kind: SectionKind) -> Step {
        let word = need!(c.be64());
        let f = word & flags::MASK;
        let offset = word & !flags::MASK;
        let continued = f & flags::CONTINUE != 0;
        match f & !flags::CONTINUE {
            flags::MEM_SIZE if !continued && kind == SectionKind::Start && self.ram_total.is_none() => {
                self.ram_total = Some(offset);
                self.mode = Mode::Parse(if offset == 0 { State::Ram(kind) } else { State::Blocks(kind, offset) });
                Step::Opaque(c.pos, Vec::new())
            }
            base @ (flags::ZERO | flags::PAGE) => {
                let idx = if continued {
                    match self.cur_block {
                        Some(i) => i,
                        None => return Step::Fallback("a CONTINUE record with no block before it".into()),
                    }
                } else {
                    let name = need!(c.name());
                    match self.blocks.iter().position(|b| b.name.as_bytes() == name) {
                        Some(i) => i,
                        None => {
                            return Step::Fallback(format!(
                                "a record of block {:?}, not in the block list",
                                lossy(name)
                            ))
                        }
                    }
                };
                let Some(info) = self.blocks.get(idx) else {
                    return Step::Fallback("a record of an unknown block".into());
                };
                if offset >= info.used_length {
                    return Step::Fallback(format!(
                        "offset {offset:#x} beyond the {:#x} bytes of block {}",
                        info.used_length, info.name
                    ));
                }
                let header = RecordHeader { block: info.name.clone(), offset, continued };
                let ev = if base == flags::ZERO {
                    let fill = need!(c.u8());
                    self.section_zeros += 1;
                    self.stats.zeros += 1;
                    Event::Zero(ZeroRecord { header, fill })
                } else {
                    let bytes = need!(c.bytes(PAGE_SIZE));
                    let Ok(data) = Box::<[u8; PAGE_SIZE]>::try_from(Box::<[u8]>::from(bytes)) else {
                        return Step::Fallback("a page of the wrong size".into());
                    };
                    self.section_pages += 1;
                    self.stats.pages += 1;
                    Event::Page(PageRecord { header, data })
                };
                self.cur_block = Some(idx);
                Step::Record(c.pos, ev)
            }
            flags::EOS if !continued && offset == 0 => {
                self.mode = Mode::Parse(State::Footer(kind));
                Step::Opaque(c.pos, Vec::new())
            }
            _ => Step::Fallback(describe_flags(f)),
        }
    }

    /// One entry of the MEM_SIZE block list: u8 len, idstr, be64 used_length, and be64 addr
    /// with `x-ignore-shared`. (The postcopy page size and the mapped-ram header are not parsed:
    /// postcopy and mapped-ram fall back earlier.)
    fn block_entry(&mut self, mut c: Cur<'_>, kind: SectionKind, remaining: u64) -> Step {
        let name = need!(c.name());
        let used_length = need!(c.be64());
        let addr = if self.config.x_ignore_shared() { Some(need!(c.be64())) } else { None };
        if used_length > remaining {
            return Step::Fallback(format!(
                "block {:?} of {used_length:#x} bytes overruns the MEM_SIZE total ({remaining:#x} left)",
                lossy(name)
            ));
        }
        if self.blocks.len() >= MAX_BLOCKS {
            return Step::Fallback(format!("more than {MAX_BLOCKS} RAM blocks"));
        }
        if self.blocks.iter().any(|b| b.name.as_bytes() == name) {
            return Step::Fallback(format!("block {:?} listed twice", lossy(name)));
        }
        let Ok(name) = BlockName::new(name) else { return Step::Fallback("a block name too long".into()) };
        self.blocks.push(RamBlockInfo { name, used_length, addr });
        let left = remaining - used_length;
        self.mode = Mode::Parse(if left == 0 { State::Ram(kind) } else { State::Blocks(kind, left) });
        Step::Opaque(c.pos, Vec::new())
    }
}
