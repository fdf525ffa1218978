//! Reading and writing the record files: bounded, never blocking on a planted FIFO, atomic writes.

use super::*;

/// Opens a record file for reading: no symbolic link (`ELOOP`), and without blocking (a FIFO
/// planted there would block `open(2)` until a writer came); `Ok(Err(problem))` for anything
/// but a regular file.
pub(super) fn open_record(path: &Path) -> io::Result<Result<(File, u64), String>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Err(format!(
            "is not a regular file ({:?})",
            meta.file_type()
        )));
    }
    Ok(Ok((file, meta.len())))
}

/// Reads at most the first `n` bytes of a record file.
pub(in crate::backend) fn read_prefix(path: &Path, n: u64) -> io::Result<Result<Vec<u8>, String>> {
    let (file, _) = match open_record(path)? {
        Ok(f) => f,
        Err(problem) => return Ok(Err(problem)),
    };
    let mut buf = Vec::new();
    file.take(n).read_to_end(&mut buf)?;
    Ok(Ok(buf))
}

/// Writes `bytes` to `dir/name` atomically: a temporary file, rename. With `durable`, the file is
/// fsynced before the rename and the directory after it.
pub(in crate::backend) fn write_atomic(
    dir: &Path,
    name: &OsStr,
    bytes: &[u8],
    durable: bool,
) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&tmp)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, dir.join(name))?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What a record file held.
pub(super) enum Record<T> {
    Missing,
    Corrupt(String),
    Found(T),
}

/// Reads a record that is absent, damaged, or present; an I/O error is an `Err`. A file larger
/// than `limit` bytes is damaged, and is not read: nothing larger is ever allocated.
pub(super) fn read_record<T>(
    path: &Path,
    limit: u64,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> io::Result<Record<T>> {
    let (file, len) = match open_record(path) {
        Ok(Ok(opened)) => opened,
        Ok(Err(problem)) => return Ok(Record::Corrupt(problem)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Record::Missing),
        Err(e) if e.raw_os_error() == Some(Errno::ELOOP as i32) => {
            return Ok(Record::Corrupt("is a symbolic link".to_owned()));
        }
        Err(e) => return Err(e),
    };
    let too_large = || {
        Record::Corrupt(format!(
            "is larger than {limit} bytes, the most this file may hold"
        ))
    };
    if len > limit {
        return Ok(too_large());
    }
    // The file may have grown since the `fstat`: read one byte more than allowed to tell.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(too_large());
    }
    Ok(match parse(&bytes) {
        Ok(v) => Record::Found(v),
        Err(problem) => Record::Corrupt(problem),
    })
}

pub(super) fn parse_holder(bytes: &[u8]) -> Result<Holder, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The record as it reads back from disk (`since` keeps milliseconds), so the leadership's
/// record and what secondaries read are equal.
pub(super) fn stored_form(record: Holder) -> Holder {
    serde_json::to_vec(&record)
        .ok()
        .and_then(|json| parse_holder(&json).ok())
        .unwrap_or(record)
}

/// Parses the term line at the start of the lock file.
pub(super) fn parse_term(bytes: &[u8]) -> Result<u64, String> {
    let Some(end) = bytes.iter().position(|b| *b == b'\n') else {
        return Err(format!(
            "no line end in {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
        ));
    };
    let digits = &bytes[..end];
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "not a decimal number: {:?}",
            String::from_utf8_lossy(&digits[..digits.len().min(32)])
        ));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "out of range".to_owned())
}

/// Reads the term stored in the lock file: `Ok(None)` for a new, empty file.
pub(super) fn read_term(file: &File) -> io::Result<Result<Option<u64>, String>> {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if n == 0 {
        return Ok(Ok(None));
    }
    Ok(parse_term(&buf[..n]).map(Some))
}

/// Writes the term at offset 0 of the lock file. The caller syncs it (see `sync_term`).
pub(super) fn write_term(file: &File, term: u64) -> io::Result<()> {
    file.write_all_at(format!("{term:020}\n").as_bytes(), 0)?;
    if file.metadata()?.len() != TERM_LEN {
        file.set_len(TERM_LEN)?;
    }
    Ok(())
}

/// Syncs the term written by `write_term`, on the acquiring thread, after the grant was handed
/// over: every process reads the term through the page cache, so the successor of a holder that
/// dies before the sync still sees it; the sync only guards against losing it in an OS crash,
/// and even then the wall-clock part of the next term keeps terms rising. Keeping the sync off
/// the path to becoming primary saves milliseconds of failover on a disk.
pub(super) fn sync_term(file: &File, lock: &str) {
    if let Err(e) = file.sync_data() {
        tracing::warn!(lock, error = %e, "cannot sync the term to disk");
    }
}

/// A state value on disk: header line, then the value.
pub(in crate::backend) fn encode_state(value: &[u8], term: u64) -> Vec<u8> {
    let mut bytes = format!("{STATE_MAGIC} 1 {term} {}\n", value.len()).into_bytes();
    bytes.extend_from_slice(value);
    bytes
}

/// Splits a record's header line `<magic> 1 <a> <b>\n` (found within the first `max` bytes):
/// `(a, b, header length)`. The state values and the registry entries share this form.
pub(super) fn split_header<'b>(
    bytes: &'b [u8],
    magic: &str,
    max: usize,
) -> Result<(&'b str, &'b str, usize), String> {
    let end = bytes
        .iter()
        .take(max)
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let line = std::str::from_utf8(&bytes[..end]).map_err(|_| "header is not UTF-8")?;
    let mut parts = line.split(' ');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(m), Some("1"), Some(a), Some(b), None) if m == magic => Ok((a, b, end + 1)),
        _ => Err(format!("unknown header {line:?}")),
    }
}

/// Parses the header line of a state file: (term, value length, header length).
pub(super) fn parse_state_header(bytes: &[u8]) -> Result<(u64, u64, usize), String> {
    let (term, len, start) = split_header(bytes, STATE_MAGIC, MAX_STATE_HEADER as usize)?;
    let line = String::from_utf8_lossy(&bytes[..start - 1]);
    let term = term
        .parse()
        .map_err(|_| format!("bad term in header {line:?}"))?;
    let len: u64 = len
        .parse()
        .map_err(|_| format!("bad length in header {line:?}"))?;
    if len > MAX_STATE_VALUE as u64 {
        return Err(format!(
            "the header says {len} bytes, larger than the maximum of {MAX_STATE_VALUE}"
        ));
    }
    Ok((term, len, start))
}

pub(super) fn parse_state(bytes: &[u8]) -> Result<Stored, String> {
    let (term, len, start) = parse_state_header(bytes)?;
    let value = &bytes[start..];
    if value.len() as u64 != len {
        return Err(format!(
            "the header says {len} bytes, the file holds {}",
            value.len()
        ));
    }
    Ok(Stored::new(value.to_vec(), term))
}
