//! Layer tars read record by record, so that a kept entry is copied out byte
//! for byte: its extension headers (PAX `x`, GNU `L`/`K`), its 512-byte
//! header and its padded data are handed back exactly as they were read.
//! That is how the debloated layers keep ownership, modes, mtimes and xattrs
//! (file capabilities live in PAX `SCHILY.xattr.*` records) without parsing
//! them.
//!
//! The reader also refuses what a layer must never contain, before anything
//! is written: absolute paths, `..` components, device nodes, symlinks that
//! climb out of the root, hard links to names outside the archive's tree,
//! oversized extension headers and paths, GNU sparse files and corrupt headers.

use std::io::{self, Read, Write};

/// Longest path (or link target) accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Largest PAX or GNU long-name record accepted, in bytes.
pub const MAX_EXTENSION: u64 = 1 << 20;
const BLOCK: usize = 512;

/// Why a layer tar was refused.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The tar tries something a layer must not (escape the root, create a
    /// device, exhaust memory).
    #[error("refused: {0}")]
    Hostile(String),
    /// The bytes are not a tar archive.
    #[error("malformed tar: {0}")]
    Malformed(String),
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What one entry makes in the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link to this target, as written in the tar.
    Symlink(String),
    /// A hard link to this (normalised) path.
    Hardlink(String),
    /// A FIFO.
    Fifo,
    /// `.wh.<name>`: the entry removes this (normalised) path of lower layers.
    Whiteout(String),
    /// `.wh..wh..opq`: the entry hides everything lower layers have in this
    /// directory.
    Opaque(String),
    /// A PAX global header: copied through, names nothing.
    Global,
}

/// One entry: its raw header bytes and what it is.
#[derive(Debug, Clone)]
pub struct Record {
    /// Extension records and the entry's own header, exactly as read.
    pub header: Vec<u8>,
    /// The entry's path, normalised: no leading `./` or `/`, no trailing `/`,
    /// `""` for the root directory.
    pub path: String,
    /// What the entry is.
    pub kind: Kind,
    /// Bytes of data that follow the header (before padding).
    pub size: u64,
}

impl Record {
    /// Bytes the data takes in the archive, padding included.
    pub fn padded_size(&self) -> u64 {
        self.size.div_ceil(BLOCK as u64) * BLOCK as u64
    }
}

/// Reads records from a tar stream.
pub struct Reader<R> {
    inner: R,
    offset: u64,
    pending: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// A reader at the start of `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            pending: 0,
            done: false,
        }
    }

    /// The next record, or `None` at the end of the archive. The data of
    /// the previous record is skipped if it was not read.
    pub fn next_record(&mut self) -> Result<Option<Record>, TarError> {
        if self.pending > 0 {
            self.skip_data()?;
        }
        if self.done {
            return Ok(None);
        }
        let mut raw = Vec::with_capacity(BLOCK);
        let mut long_name: Option<String> = None;
        let mut long_link: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut pax_link: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        loop {
            let at = self.offset;
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block)? {
                if raw.is_empty() {
                    // Some writers end without the two zero blocks.
                    self.done = true;
                    return Ok(None);
                }
                return Err(TarError::Malformed(format!(
                    "the archive ends inside the entry at byte {at}"
                )));
            }
            if block.iter().all(|b| *b == 0) {
                if !raw.is_empty() {
                    return Err(TarError::Malformed(format!(
                        "a zero block follows extension headers at byte {at}"
                    )));
                }
                self.done = true;
                return Ok(None);
            }
            check_sum(&block, at)?;
            let size = number(&block[124..136])
                .ok_or_else(|| TarError::Malformed(format!("bad size field at byte {at}")))?;
            let flag = block[156];
            raw.extend_from_slice(&block);
            match flag {
                b'x' | b'L' | b'K' => {
                    if size > MAX_EXTENSION {
                        return Err(TarError::Hostile(format!(
                            "an extension header of {size} bytes at byte {at} (the limit is {MAX_EXTENSION})"
                        )));
                    }
                    let start = raw.len();
                    let padded = size.div_ceil(BLOCK as u64) as usize * BLOCK;
                    raw.resize(start + padded, 0);
                    self.read_exact(&mut raw[start..])?;
                    let data = &raw[start..start + size as usize];
                    match flag {
                        b'x' => {
                            for (key, value) in pax_records(data, at)? {
                                match key {
                                    "path" => pax_path = Some(value.to_string()),
                                    "linkpath" => pax_link = Some(value.to_string()),
                                    "size" => {
                                        pax_size = Some(value.parse().map_err(|_| {
                                            TarError::Malformed(format!(
                                                "bad PAX size {value:?} at byte {at}"
                                            ))
                                        })?)
                                    }
                                    _ => {}
                                }
                            }
                        }
                        b'L' => long_name = Some(c_string(data)),
                        _ => long_link = Some(c_string(data)),
                    }
                }
                b'g' => {
                    if raw.len() > BLOCK {
                        return Err(TarError::Malformed(format!(
                            "a global header follows extension headers at byte {at}"
                        )));
                    }
                    if size > MAX_EXTENSION {
                        return Err(TarError::Hostile(format!(
                            "a global header of {size} bytes at byte {at}"
                        )));
                    }
                    self.pending = size;
                    return Ok(Some(Record {
                        header: raw,
                        path: String::new(),
                        kind: Kind::Global,
                        size,
                    }));
                }
                _ => {
                    let size = pax_size.unwrap_or(size);
                    let name = match (long_name, pax_path) {
                        (_, Some(p)) => p,
                        (Some(n), None) => n,
                        (None, None) => ustar_name(&block),
                    };
                    let path = normalise(&name)
                        .map_err(|why| TarError::Hostile(format!("entry {name:?}: {why}")))?;
                    let link = pax_link
                        .or(long_link)
                        .unwrap_or_else(|| c_string(&block[157..257]));
                    let kind = kind_of(flag, &path, link)?;
                    self.pending = size;
                    return Ok(Some(Record {
                        header: raw,
                        path,
                        kind,
                        size,
                    }));
                }
            }
        }
    }

    /// Copies the current record's padded data to `out`, byte for byte.
    pub fn copy_data(&mut self, out: &mut impl Write) -> Result<(), TarError> {
        let padded = self.pending.div_ceil(BLOCK as u64) * BLOCK as u64;
        let copied = io::copy(&mut (&mut self.inner).take(padded), out)?;
        self.offset += copied;
        self.pending = 0;
        if copied != padded {
            return Err(TarError::Malformed("the archive ends inside a file".into()));
        }
        Ok(())
    }

    fn skip_data(&mut self) -> Result<(), TarError> {
        self.copy_data(&mut io::sink())
    }

    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut got = 0;
        while got < BLOCK {
            match self.inner.read(&mut block[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Malformed("the archive ends mid-block".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.offset += BLOCK as u64;
        Ok(true)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                TarError::Malformed("the archive ends inside a header".into())
            }
            _ => TarError::Io(e),
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }
}

/// The two zero blocks that end an archive.
pub fn write_end(out: &mut impl Write) -> io::Result<()> {
    out.write_all(&[0u8; 2 * BLOCK])
}

fn check_sum(block: &[u8; BLOCK], at: u64) -> Result<(), TarError> {
    let want = number(&block[148..156])
        .ok_or_else(|| TarError::Malformed(format!("bad checksum field at byte {at}")))?;
    // The checksum field counts as spaces; some old writers summed signed bytes.
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { *b };
        unsigned += b as u64;
        signed += b as i8 as i64;
    }
    if want != unsigned && want as i64 != signed {
        return Err(TarError::Malformed(format!(
            "header checksum mismatch at byte {at}: not a tar archive, or a corrupt one"
        )));
    }
    Ok(())
}

/// An octal (or GNU base-256) numeric field.
fn number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = (field[0] & 0x3f) as u64;
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(*b as u64)?;
        }
        return Some(v);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| *b != 0 && *b != b' ')
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&text).ok()?, 8).ok()
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn ustar_name(block: &[u8; BLOCK]) -> String {
    let name = c_string(&block[0..100]);
    // POSIX ustar keeps a prefix; GNU's "ustar  " magic uses that space otherwise.
    if &block[257..263] == b"ustar\0" {
        let prefix = c_string(&block[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

fn pax_records(mut data: &[u8], at: u64) -> Result<Vec<(&str, &str)>, TarError> {
    let bad = || TarError::Malformed(format!("bad PAX record at byte {at}"));
    let mut out = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let space = data.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &data[space + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        let key = std::str::from_utf8(&record[..eq]).map_err(|_| bad())?;
        // Values such as xattrs may be binary; only the names we read must be text.
        if let Ok(value) = std::str::from_utf8(&record[eq + 1..]) {
            out.push((key, value));
        } else if matches!(key, "path" | "linkpath" | "size") {
            return Err(bad());
        }
        data = &data[len..];
    }
    Ok(out)
}

/// `name` as a path relative to the root, or why it cannot be one.
pub fn normalise(name: &str) -> Result<String, String> {
    if name.len() > MAX_PATH {
        return Err(format!("a path of {} bytes", name.len()));
    }
    if name.starts_with('/') {
        return Err("an absolute path".into());
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("a `..` component".into()),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn kind_of(flag: u8, path: &str, link: String) -> Result<Kind, TarError> {
    let hostile = |why: String| Err(TarError::Hostile(format!("entry {path:?}: {why}")));
    if link.len() > MAX_PATH {
        return hostile(format!("a link target of {} bytes", link.len()));
    }
    let (dir, base) = match path.rsplit_once('/') {
        Some((d, b)) => (d, b),
        None => ("", path),
    };
    match flag {
        b'0' | b'\0' | b'7' => {
            if base == ".wh..wh..opq" {
                Ok(Kind::Opaque(dir.to_string()))
            } else if let Some(hidden) = base.strip_prefix(".wh.") {
                if hidden.is_empty() {
                    return hostile("an empty whiteout".into());
                }
                Ok(Kind::Whiteout(join(dir, hidden)))
            } else {
                Ok(Kind::File)
            }
        }
        b'1' => {
            let target = match normalise(&link) {
                Ok(t) => t,
                Err(why) => return hostile(format!("hard link: {why}")),
            };
            if target.is_empty() {
                return hostile("a hard link to the root".into());
            }
            Ok(Kind::Hardlink(target))
        }
        b'2' => {
            if link.is_empty() {
                return hostile("a symlink without a target".into());
            }
            if escapes(dir, &link) {
                return hostile(format!("a symlink to {link:?} climbs out of the root"));
            }
            Ok(Kind::Symlink(link))
        }
        b'3' | b'4' => hostile("a device node".into()),
        b'5' => Ok(Kind::Dir),
        b'6' => Ok(Kind::Fifo),
        b'S' => hostile("a GNU sparse file".into()),
        other => hostile(format!("unknown entry type {:?}", other as char)),
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Whether `target`, read from a symlink in `dir`, names something above the root.
fn escapes(dir: &str, target: &str) -> bool {
    let mut depth: i64 = if target.starts_with('/') {
        0
    } else {
        dir.split('/').filter(|p| !p.is_empty()).count() as i64
    };
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
pub(crate) mod tests;
