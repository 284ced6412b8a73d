//! MXNet RecordIO (`.rec` + `.idx` + `property`), the packing of the insightface training sets
//! (MS1MV2, MS1MV3, Glint360K, WebFace42M).
//!
//! Format (dmlc-core `recordio.h`, mxnet `recordio.py`):
//! - a chunk is a u32 LE magic `0xCED7230A`, a u32 LE `lrec` (top 3 bits = cflag, low 29 bits =
//!   length), the payload, zero padding to a 4-byte boundary;
//! - cflag 0 is a whole record; 1/2/3 are the first/middle/last part of a record the writer
//!   split at each aligned occurrence of the magic in the payload: the reader re-inserts the four
//!   magic bytes between parts;
//! - a record payload starts with an `IRHeader` (u32 flag, f32 label, u64 id, u64 id2); when
//!   `flag > 0`, `flag` f32 labels follow and the header label is 0; the rest is the image.
//!
//! Two layouts are in use. insightface's (layout A, `face2rec2` / `RecBuilder`): key 0 is a
//! header with `flag ≥ 2`, an empty payload and labels `[first_identity_key, end_identity_key]`;
//! images are keys `1..first_identity_key`; identity records `[img_start, img_end)` follow.
//! im2rec's (layout B): images only, keys from the `.idx`. Key 0 counts as a header only when
//! `flag ≥ 2` and its payload is empty; without key 0 the `.idx` keys are used.
//!
//! Reads are positioned (`pread`), so one reader serves many rayon workers at once; the loader
//! reads a batch's records in file order, nearby ones in one read
//! ([`RecordIoDataset`]'s [`FaceDataset::samples`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rayon::prelude::*;

use crate::dataset::FaceDataset;
use crate::{Error, Result};

/// The chunk magic, as a little-endian u32.
pub const MAGIC: u32 = 0xCED7_230A;
/// Size of the `IRHeader` in bytes.
pub const IR_HEADER_LEN: usize = 24;
const LEN_MASK: u32 = (1 << 29) - 1;

/// The image-record header of mxnet's `recordio.pack`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IrHeader {
    /// Number of extra f32 labels after the header (0: the label is `label`).
    pub flag: u32,
    /// The scalar label (0 when `flag > 0`).
    pub label: f32,
    /// Record id (the key for im2rec).
    pub id: u64,
    /// Second id (unused by insightface).
    pub id2: u64,
}

/// A parsed image record: header, labels and the encoded image (may be empty).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    /// The header.
    pub header: IrHeader,
    /// The label array when `flag > 0`, else `[header.label]`.
    pub labels: Vec<f32>,
    /// The encoded image (JPEG or PNG); empty for insightface header and identity records.
    pub image: Vec<u8>,
}

impl ImageRecord {
    /// Parse a record payload. `Err` holds what is wrong (the caller adds file and key).
    ///
    /// # Errors
    /// A payload shorter than its header and label array.
    pub fn parse(payload: &[u8]) -> std::result::Result<Self, String> {
        let (header, labels, image_start) = parse_header(payload)?;
        Ok(Self {
            header,
            labels,
            image: payload[image_start..].to_vec(),
        })
    }

    /// The class label: the first label when there is an array.
    pub fn label(&self) -> f32 {
        self.labels.first().copied().unwrap_or(self.header.label)
    }

    /// A record with a scalar label (`flag` 0), as mxnet's `pack` writes a number label.
    pub fn new(label: f32, id: u64, image: Vec<u8>) -> Self {
        Self {
            header: IrHeader {
                flag: 0,
                label,
                id,
                id2: 0,
            },
            labels: vec![label],
            image,
        }
    }

    /// A record with a label array (`flag` = its length, header label 0).
    pub fn with_labels(labels: Vec<f32>, id: u64, image: Vec<u8>) -> Self {
        Self {
            header: IrHeader {
                flag: labels.len() as u32,
                label: 0.0,
                id,
                id2: 0,
            },
            labels,
            image,
        }
    }

    /// The payload bytes (`mx.recordio.pack`): header, labels when `flag > 0`, image.
    pub fn pack(&self) -> Vec<u8> {
        let labels: &[f32] = if self.header.flag == 0 {
            &[]
        } else {
            &self.labels
        };
        let mut out = Vec::with_capacity(IR_HEADER_LEN + 4 * labels.len() + self.image.len());
        out.extend_from_slice(&(labels.len() as u32).to_le_bytes());
        let label = if labels.is_empty() {
            self.header.label
        } else {
            0.0
        };
        out.extend_from_slice(&label.to_le_bytes());
        out.extend_from_slice(&self.header.id.to_le_bytes());
        out.extend_from_slice(&self.header.id2.to_le_bytes());
        for l in labels {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&self.image);
        out
    }
}

/// Parse the header and labels of a payload; returns them and the start of the image bytes.
fn parse_header(payload: &[u8]) -> std::result::Result<(IrHeader, Vec<f32>, usize), String> {
    if payload.len() < IR_HEADER_LEN {
        return Err(format!(
            "payload of {} bytes is shorter than the {IR_HEADER_LEN}-byte IRHeader",
            payload.len()
        ));
    }
    let u32_at = |o: usize| u32::from_le_bytes(payload[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(payload[o..o + 8].try_into().expect("8 bytes"));
    let header = IrHeader {
        flag: u32_at(0),
        label: f32::from_bits(u32_at(4)),
        id: u64_at(8),
        id2: u64_at(16),
    };
    let n = header.flag as usize;
    let end = IR_HEADER_LEN + 4 * n;
    if payload.len() < end {
        return Err(format!(
            "IRHeader flag {n} announces {n} f32 labels but the payload has only {} bytes",
            payload.len()
        ));
    }
    let labels = if n == 0 {
        vec![header.label]
    } else {
        (0..n)
            .map(|i| f32::from_bits(u32_at(IR_HEADER_LEN + 4 * i)))
            .collect()
    };
    Ok((header, labels, end))
}

/// Reassemble the record whose first chunk starts at byte 0 of `bytes` (the chunk format of
/// the module documentation). `Ok(Some((payload, consumed)))`: the payload (multi-part records
/// joined) and the bytes its chunks take, padding included; `Ok(None)`: `bytes` ends before the
/// record does; `Err`: what is malformed (bad magic, unexpected cflag). Allocates no more than
/// `bytes.len()`, whatever the length fields claim.
///
/// # Errors
/// A bad magic or an inconsistent multi-part sequence.
pub fn parse_record(bytes: &[u8]) -> std::result::Result<Option<(Vec<u8>, usize)>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut part = 0usize;
    loop {
        let Some(head) = bytes.get(pos..pos + 8) else {
            return Ok(None);
        };
        let magic = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(format!(
                "bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x})"
            ));
        }
        let lrec = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        let (cflag, len) = (lrec >> 29, (lrec & LEN_MASK) as usize);
        match (part, cflag) {
            (0, 0) | (0, 1) => {}
            (p, 2) | (p, 3) if p > 0 => out.extend_from_slice(&MAGIC.to_le_bytes()),
            _ => {
                return Err(format!(
                    "chunk {part} at byte {pos} has unexpected cflag {cflag}"
                ))
            }
        }
        let Some(data) = bytes.get(pos + 8..pos + 8 + len) else {
            return Ok(None);
        };
        out.extend_from_slice(data);
        pos += 8 + len.div_ceil(4) * 4;
        part += 1;
        if cflag == 0 || cflag == 3 {
            return Ok(Some((out, pos.min(bytes.len()))));
        }
    }
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

/// Random access to the records of a `.rec` file through its `.idx`.
#[derive(Debug)]
pub struct RecordIoReader {
    rec_path: PathBuf,
    idx_path: PathBuf,
    file: File,
    file_len: u64,
    /// `(key, offset)` sorted by key, keys unique.
    entries: Vec<(u64, u64)>,
}

impl RecordIoReader {
    /// Open `rec` with the index `idx` (lines `key<TAB>offset`).
    ///
    /// # Errors
    /// Unreadable files, a malformed `.idx` line, duplicate keys.
    pub fn open(rec: impl AsRef<Path>, idx: impl AsRef<Path>) -> Result<Self> {
        let rec_path = rec.as_ref().to_path_buf();
        let idx_path = idx.as_ref().to_path_buf();
        let file = File::open(&rec_path).map_err(|source| Error::Io {
            path: rec_path.clone(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| Error::Io {
                path: rec_path.clone(),
                source,
            })?
            .len();
        let text = std::fs::read_to_string(&idx_path).map_err(|source| Error::Io {
            path: idx_path.clone(),
            source,
        })?;
        let entries = parse_idx(&text).map_err(|what| Error::Format {
            path: idx_path.clone(),
            what,
        })?;
        tracing::debug!(rec = %rec_path.display(), records = entries.len(), "opened RecordIO file");
        let past_end: Vec<&(u64, u64)> = entries.iter().filter(|&&(_, o)| o >= file_len).collect();
        if let Some(&&(key, offset)) = past_end.first() {
            // Reading those records fails with an error naming them; warn once at open.
            tracing::warn!(
                idx = %idx_path.display(),
                rec = %rec_path.display(),
                records = past_end.len(),
                first_key = key,
                first_offset = offset,
                rec_bytes = file_len,
                "index offsets past the end of the .rec (truncated file?)"
            );
        }
        Ok(Self {
            rec_path,
            idx_path,
            file,
            file_len,
            entries,
        })
    }

    /// The `.rec` file.
    pub fn rec_path(&self) -> &Path {
        &self.rec_path
    }

    /// The `.idx` file.
    pub fn idx_path(&self) -> &Path {
        &self.idx_path
    }

    /// Number of keys in the index.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when the index is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `(key, byte offset)` pairs sorted by key.
    pub fn entries(&self) -> &[(u64, u64)] {
        &self.entries
    }

    /// Byte offset of `key`, if the index has it.
    pub fn offset(&self, key: u64) -> Option<u64> {
        self.entries
            .binary_search_by_key(&key, |&(k, _)| k)
            .ok()
            .map(|i| self.entries[i].1)
    }

    fn format_err(&self, key: Option<u64>, offset: u64, what: impl std::fmt::Display) -> Error {
        let what = match key {
            Some(k) => format!("record key {k} at byte offset {offset}: {what}"),
            None => format!("record at byte offset {offset}: {what}"),
        };
        Error::Format {
            path: self.rec_path.clone(),
            what,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_exact_at(&self.file, buf, offset).map_err(|source| Error::Io {
            path: self.rec_path.clone(),
            source,
        })
    }

    /// Read the chunk header at `pos`: `(cflag, length)`.
    fn chunk_header(&self, key: Option<u64>, start: u64, pos: u64) -> Result<(u32, u32)> {
        if pos == start && pos >= self.file_len {
            // The index points outside the data file: say which index did.
            return Err(self.format_err(
                key,
                start,
                format!(
                    "offset from {} is past the end of the .rec ({} bytes): the .rec is \
                     truncated or the index belongs to another file",
                    self.idx_path.display(),
                    self.file_len
                ),
            ));
        }
        if pos + 8 > self.file_len {
            return Err(self.format_err(
                key,
                start,
                format!(
                    "truncated file: chunk header at byte {pos} is past the end ({} bytes)",
                    self.file_len
                ),
            ));
        }
        let mut head = [0u8; 8];
        self.read_at(&mut head, pos)?;
        let magic = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(self.format_err(
                key,
                start,
                format!("bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x})"),
            ));
        }
        let lrec = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        let (cflag, len) = (lrec >> 29, lrec & LEN_MASK);
        if pos + 8 + u64::from(len) > self.file_len {
            return Err(self.format_err(
                key,
                start,
                format!(
                    "truncated file: chunk at byte {pos} needs {len} payload bytes, the file ends at {}",
                    self.file_len
                ),
            ));
        }
        Ok((cflag, len))
    }

    fn read_raw_inner(&self, key: Option<u64>, offset: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut pos = offset;
        let mut part = 0usize;
        loop {
            let (cflag, len) = self.chunk_header(key, offset, pos)?;
            match (part, cflag) {
                (0, 0) | (0, 1) => {}
                (p, 2) | (p, 3) if p > 0 => out.extend_from_slice(&MAGIC.to_le_bytes()),
                _ => {
                    return Err(self.format_err(
                        key,
                        offset,
                        format!("chunk {part} at byte {pos} has unexpected cflag {cflag}"),
                    ))
                }
            }
            let start = out.len();
            out.resize(start + len as usize, 0);
            self.read_at(&mut out[start..], pos + 8)?;
            pos += 8 + u64::from(len.div_ceil(4) * 4);
            part += 1;
            if cflag == 0 || cflag == 3 {
                return Ok(out);
            }
        }
    }

    /// The raw payload of the record starting at byte `offset` (multi-part records reassembled).
    ///
    /// # Errors
    /// `Error::Format` naming the file and offset for a bad magic, a truncated file or an
    /// inconsistent multi-part sequence.
    pub fn read_raw_at(&self, offset: u64) -> Result<Vec<u8>> {
        self.read_raw_inner(None, offset)
    }

    /// The raw payload of record `key`.
    ///
    /// # Errors
    /// A key missing from the index, or the errors of [`Self::read_raw_at`] (naming the key).
    pub fn read_raw(&self, key: u64) -> Result<Vec<u8>> {
        let offset = self.offset(key).ok_or_else(|| Error::Format {
            path: self.idx_path.clone(),
            what: format!("key {key} is not in the index"),
        })?;
        self.read_raw_inner(Some(key), offset)
    }

    /// Mean bytes per record: the `.rec` size over the index length (at least 64).
    fn mean_record_len(&self) -> u64 {
        (self.file_len / self.entries.len().max(1) as u64).max(64)
    }

    /// Bytes `[start, end)` of the `.rec`, `end` clamped to the file's end.
    fn read_span(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let end = end.min(self.file_len).max(start);
        let mut buf = vec![0u8; (end - start) as usize];
        self.read_at(&mut buf, start)?;
        Ok(buf)
    }

    /// Record `key` parsed as an image record.
    ///
    /// # Errors
    /// As [`Self::read_raw`], and a payload too short for its header.
    pub fn read_record(&self, key: u64) -> Result<ImageRecord> {
        let offset = self.offset(key).unwrap_or(0);
        let raw = self.read_raw(key)?;
        ImageRecord::parse(&raw).map_err(|what| self.format_err(Some(key), offset, what))
    }

    /// Header and labels of record `key` without reading its image (one small read for
    /// single-chunk records); also the length of the image bytes.
    ///
    /// # Errors
    /// As [`Self::read_record`].
    pub fn read_header(&self, key: u64) -> Result<(IrHeader, Vec<f32>, usize)> {
        let offset = self.offset(key).ok_or_else(|| Error::Format {
            path: self.idx_path.clone(),
            what: format!("key {key} is not in the index"),
        })?;
        let (cflag, len) = self.chunk_header(Some(key), offset, offset)?;
        if cflag != 0 {
            let rec = self.read_record(key)?;
            let n = rec.image.len();
            return Ok((rec.header, rec.labels, n));
        }
        // Enough for the header and a few labels; longer label arrays take a second read.
        let mut want = (len as usize).min(IR_HEADER_LEN + 4 * 8);
        let mut buf = vec![0u8; want];
        self.read_at(&mut buf, offset + 8)?;
        if buf.len() >= IR_HEADER_LEN {
            let flag = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            let need = (IR_HEADER_LEN + 4 * flag).min(len as usize);
            if need > want {
                want = need;
                buf.resize(want, 0);
                self.read_at(&mut buf, offset + 8)?;
            }
        }
        let (header, labels, image_start) =
            parse_header(&buf).map_err(|what| self.format_err(Some(key), offset, what))?;
        Ok((header, labels, len as usize - image_start))
    }
}

/// Writes a `.rec` and its `.idx` as mxnet's `MXIndexedRecordIO` does: a payload holding the
/// magic at 4-aligned offsets is split into cflag 1/2/3 chunks there.
#[derive(Debug)]
pub struct RecordIoWriter {
    rec_path: PathBuf,
    rec: std::io::BufWriter<File>,
    idx: std::io::BufWriter<File>,
    pos: u64,
}

impl RecordIoWriter {
    /// Create (truncate) `rec` and `idx`.
    ///
    /// # Errors
    /// Files that cannot be created.
    pub fn create(rec: impl AsRef<Path>, idx: impl AsRef<Path>) -> Result<Self> {
        let create = |p: &Path| {
            File::create(p)
                .map(std::io::BufWriter::new)
                .map_err(|source| Error::Io {
                    path: p.to_path_buf(),
                    source,
                })
        };
        Ok(Self {
            rec_path: rec.as_ref().to_path_buf(),
            rec: create(rec.as_ref())?,
            idx: create(idx.as_ref())?,
            pos: 0,
        })
    }

    /// Append record `key` with raw `payload` (see [`ImageRecord::pack`]).
    ///
    /// # Errors
    /// A payload of 2^29 bytes or more (dmlc's writer refuses those too), or a write error.
    pub fn write(&mut self, key: u64, payload: &[u8]) -> Result<()> {
        use std::io::Write;
        let out = encode_record(payload).map_err(|what| Error::Format {
            path: self.rec_path.clone(),
            what: format!("record key {key}: {what}"),
        })?;
        let io = |source| Error::Io {
            path: self.rec_path.clone(),
            source,
        };
        writeln!(self.idx, "{key}\t{}", self.pos).map_err(io)?;
        self.rec.write_all(&out).map_err(io)?;
        self.pos += out.len() as u64;
        Ok(())
    }

    /// Bytes written to the `.rec` so far (the offset of the next record).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Flush both files.
    ///
    /// # Errors
    /// A write error.
    pub fn finish(mut self) -> Result<()> {
        use std::io::Write;
        let path = self.rec_path.clone();
        self.rec
            .flush()
            .and_then(|()| self.idx.flush())
            .map_err(|source| Error::Io { path, source })
    }
}

/// The bytes dmlc's `RecordIOWriter::WriteRecord` emits for one record: chunks split at every
/// 4-aligned occurrence of the magic in `payload` (cflag 1/2/3; the magic itself is dropped and
/// re-inserted by readers), or one cflag-0 chunk; zero padding to a 4-byte boundary.
///
/// # Errors
/// A payload of 2^29 bytes or more: dmlc refuses those (its length field has 29 bits) rather
/// than splitting them, so no reader could take them.
pub fn encode_record(payload: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if payload.len() > LEN_MASK as usize {
        return Err(format!(
            "payload of {} bytes is too long (RecordIO records must be under 2^29 bytes)",
            payload.len()
        ));
    }
    let magic = MAGIC.to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    let chunk = |out: &mut Vec<u8>, cflag: u32, data: &[u8]| {
        out.extend_from_slice(&magic);
        out.extend_from_slice(&((cflag << 29) | data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    };
    let mut start = 0;
    for i in (0..payload.len() / 4 * 4).step_by(4) {
        if payload[i..i + 4] == magic {
            chunk(&mut out, if start == 0 { 1 } else { 2 }, &payload[start..i]);
            start = i + 4;
        }
    }
    chunk(&mut out, if start == 0 { 0 } else { 3 }, &payload[start..]);
    // Every split point is 4-aligned, so padding the whole output pads the last part as dmlc
    // does (to the record length rounded up to 4).
    out.resize(out.len().div_ceil(4) * 4, 0);
    Ok(out)
}

/// Parse the text of a `.idx` (lines `key<TAB>offset`, blank lines ignored) into `(key,
/// offset)` pairs sorted by key. `Err` holds what is wrong (a malformed line, a duplicate key).
///
/// # Errors
/// A line without two unsigned integers, or a key given twice.
pub fn parse_idx(text: &str) -> std::result::Result<Vec<(u64, u64)>, String> {
    let mut entries = Vec::with_capacity(text.len() / 12);
    for (line_no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parse = |f: Option<&str>| f.and_then(|s| s.parse::<u64>().ok());
        match (parse(fields.next()), parse(fields.next())) {
            (Some(k), Some(o)) => entries.push((k, o)),
            _ => {
                return Err(format!(
                    "line {}: expected \"key<TAB>offset\", found {line:?}",
                    line_no + 1
                ))
            }
        }
    }
    entries.sort_unstable();
    if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("duplicate key {}", w[0].0));
    }
    Ok(entries)
}

/// The `property` file of an insightface dataset: `num_classes,height,width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordProperty {
    /// Number of identities.
    pub num_classes: usize,
    /// Image height in pixels.
    pub height: u32,
    /// Image width in pixels.
    pub width: u32,
}

impl RecordProperty {
    /// Read a `property` file.
    ///
    /// # Errors
    /// An unreadable file or a line other than three comma-separated integers.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let fields: Vec<&str> = text.trim().split(',').map(str::trim).collect();
        let bad = || Error::Format {
            path: path.to_path_buf(),
            what: format!(
                "expected \"num_classes,height,width\", found {:?}",
                text.trim()
            ),
        };
        if fields.len() != 3 {
            return Err(bad());
        }
        Ok(Self {
            num_classes: fields[0].parse().map_err(|_| bad())?,
            height: fields[1].parse().map_err(|_| bad())?,
            width: fields[2].parse().map_err(|_| bad())?,
        })
    }
}

/// Which packing a `.rec` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLayout {
    /// insightface: header record 0, images `1..first_identity_key`, identity records after.
    Insightface {
        /// First identity-record key (= one past the last image key).
        first_identity_key: u64,
        /// One past the last identity-record key.
        end_identity_key: u64,
    },
    /// im2rec: every `.idx` key is an image.
    Flat,
}

/// The format of encoded image bytes, sniffed by magic: JPEG, PNG or PNM (PBM/PGM/PPM/PAM,
/// `P1`..`P7` then whitespace); `None` for anything else.
pub(crate) fn sniff_format(bytes: &[u8]) -> Option<image::ImageFormat> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(image::ImageFormat::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(image::ImageFormat::Png)
    } else if bytes.len() > 2
        && bytes[0] == b'P'
        && (b'1'..=b'7').contains(&bytes[1])
        && bytes[2].is_ascii_whitespace()
    {
        Some(image::ImageFormat::Pnm)
    } else {
        None
    }
}

/// Bytes a decoded image may take: the `image` crate's default allocation limit.
const MAX_DECODED_BYTES: u64 = 512 << 20;

/// Decode a JPEG, PNG or PNM (sniffed by magic) to RGB; grey images get R = G = B. `Err` holds
/// what is wrong. Never panics on malformed input, and refuses images whose decoded size
/// would pass 512 MiB before allocating them.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let Some(format) = sniff_format(bytes) else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "not a JPEG, PNG or PNM ({} bytes starting {})",
            bytes.len(),
            head.join(" ")
        ));
    };
    if format == image::ImageFormat::Jpeg && !jpeg_has_eoi(bytes) {
        // The JPEG decoder pads a cut-off scan with grey instead of failing: catch it here.
        return Err(format!(
            "truncated JPEG ({} bytes, no end-of-image marker)",
            bytes.len()
        ));
    }
    if format == image::ImageFormat::Jpeg {
        if let Some(r) = decode_jpeg_rgb(bytes) {
            return r;
        }
    }
    image::load_from_memory_with_format(bytes, format)
        .map(image::DynamicImage::into_rgb8)
        .map_err(|e| format!("undecodable {format:?} image: {e}"))
}

/// The colour JPEGs (YCbCr or RGB, nearly all of them) decoded straight to RGB with zune-jpeg,
/// the decoder and options the `image` crate uses, so the pixels are the same; without its
/// copy of the input, second header parse and copy of the output. `None`: another colour
/// space (grey, CMYK), left to the `image` crate.
fn decode_jpeg_rgb(bytes: &[u8]) -> Option<std::result::Result<RgbImage, String>> {
    use zune_core::colorspace::ColorSpace;
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        options,
    );
    let bad = |e: zune_jpeg::errors::DecodeErrors| format!("undecodable Jpeg image: {e}");
    if let Err(e) = decoder.decode_headers() {
        return Some(Err(bad(e)));
    }
    if !matches!(
        decoder.input_colorspace(),
        Some(ColorSpace::YCbCr | ColorSpace::RGB)
    ) {
        return None;
    }
    let (w, h) = decoder.dimensions()?;
    if (w as u64) * (h as u64) * 3 > MAX_DECODED_BYTES {
        return Some(Err(format!(
            "undecodable Jpeg image: {w}x{h} pixels exceed the {} MiB decode limit",
            MAX_DECODED_BYTES >> 20
        )));
    }
    let (w32, h32) = (u32::try_from(w).ok()?, u32::try_from(h).ok()?);
    Some(decoder.decode().map_err(bad).and_then(|raw| {
        RgbImage::from_raw(w32, h32, raw)
            .ok_or_else(|| format!("undecodable Jpeg image: short {w}x{h} output"))
    }))
}

/// `true` when an end-of-image marker (FF D9) ends the stream, allowing trailing padding.
fn jpeg_has_eoi(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// A RecordIO training set as a [`FaceDataset`]; dataset index `i` is the `i`-th image key.
#[derive(Debug)]
pub struct RecordIoDataset {
    reader: RecordIoReader,
    /// Range into `reader.entries()` holding the images.
    first: usize,
    count: usize,
    num_classes: usize,
    layout: RecordLayout,
    property: Option<RecordProperty>,
}

impl RecordIoDataset {
    /// Open a dataset from a directory holding `train.rec` + `train.idx` (+ `property`), a
    /// `.rec` path (its `.idx` beside it), or a prefix `p` (`p.rec`, `p.idx`). A `property`
    /// file in the same directory gives the class count.
    ///
    /// # Errors
    /// Missing files, a malformed index or header record.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (rec, idx) = if path.is_dir() {
            (path.join("train.rec"), path.join("train.idx"))
        } else if path.extension().is_some_and(|e| e == "rec" || e == "idx") {
            (path.with_extension("rec"), path.with_extension("idx"))
        } else {
            let s = path.as_os_str().to_os_string();
            let mut rec = s.clone();
            rec.push(".rec");
            let mut idx = s;
            idx.push(".idx");
            (PathBuf::from(rec), PathBuf::from(idx))
        };
        let dir = rec.parent().map(Path::to_path_buf).unwrap_or_default();
        let property = dir.join("property");
        let found = property.is_file().then_some(property.as_path());
        Self::open_inner(rec, idx, found, Some(&property))
    }

    /// Open from explicit `.rec`, `.idx` and optional `property` paths.
    ///
    /// # Errors
    /// As [`Self::open`]; a `property` path that cannot be read or parsed.
    pub fn open_files(
        rec: impl AsRef<Path>,
        idx: impl AsRef<Path>,
        property: Option<&Path>,
    ) -> Result<Self> {
        Self::open_inner(rec.as_ref(), idx.as_ref(), property, None)
    }

    /// `looked_for`: where `open` looked for a property file (for the error when it is needed).
    fn open_inner(
        rec: impl AsRef<Path>,
        idx: impl AsRef<Path>,
        property: Option<&Path>,
        looked_for: Option<&Path>,
    ) -> Result<Self> {
        let reader = RecordIoReader::open(rec, idx)?;
        let property = property.map(RecordProperty::read).transpose()?;
        let entries = reader.entries();
        let mut layout = RecordLayout::Flat;
        let (mut first, mut count) = (0, entries.len());
        if entries.first().is_some_and(|&(k, _)| k == 0) {
            let (header, labels, image_len) = reader.read_header(0)?;
            if header.flag >= 2 && image_len == 0 {
                let (first_id, end_id) = reader.identity_range(&labels)?;
                layout = RecordLayout::Insightface {
                    first_identity_key: first_id,
                    end_identity_key: end_id,
                };
                // Keys 1..first_id must all be in the index: they are a contiguous run.
                first = 1;
                count = entries.partition_point(|&(k, _)| k < first_id) - 1;
                if count as u64 != first_id - 1 {
                    return Err(Error::Format {
                        path: reader.idx_path.clone(),
                        what: format!(
                            "layout A header says images are keys 1..{first_id}, the index has {count} of them"
                        ),
                    });
                }
            }
        }
        let mut ds = Self {
            reader,
            first,
            count,
            num_classes: 0,
            layout,
            property,
        };
        ds.num_classes = match (ds.property, ds.layout) {
            (Some(p), _) => p.num_classes,
            (
                None,
                RecordLayout::Insightface {
                    first_identity_key,
                    end_identity_key,
                },
            ) => (end_identity_key - first_identity_key) as usize,
            (None, RecordLayout::Flat) => {
                // Without a property file the class count of an images-only pack is the
                // largest label + 1: one header read per record.
                tracing::info!(
                    rec = %ds.reader.rec_path.display(),
                    images = ds.count,
                    "no property file: counting classes from the record labels"
                );
                let mut max = None;
                for i in 0..ds.count {
                    let l = ds.label(i).map_err(|e| Error::Format {
                        path: ds.reader.rec_path.clone(),
                        what: format!(
                            "no property file ({}), so the class count comes from the labels, \
                             and reading them failed: {e}",
                            looked_for.map_or_else(
                                || "none given".to_string(),
                                |p| format!("{} does not exist", p.display())
                            )
                        ),
                    })?;
                    max = max.max(Some(l));
                }
                max.map_or(0, |m| m as usize + 1)
            }
        };
        tracing::info!(
            rec = %ds.reader.rec_path.display(),
            images = ds.count,
            classes = ds.num_classes,
            layout = ?ds.layout,
            "opened RecordIO dataset"
        );
        Ok(ds)
    }

    /// The layout found at open.
    pub fn layout(&self) -> RecordLayout {
        self.layout
    }

    /// The `property` file, if there was one.
    pub fn property(&self) -> Option<RecordProperty> {
        self.property
    }

    /// The underlying reader.
    pub fn reader(&self) -> &RecordIoReader {
        &self.reader
    }

    /// Record key of dataset index `index`.
    ///
    /// # Errors
    /// `index` out of range.
    pub fn key(&self, index: usize) -> Result<u64> {
        self.entry(index).map(|(k, _)| k)
    }

    fn entry(&self, index: usize) -> Result<(u64, u64)> {
        if index >= self.count {
            return Err(Error::OutOfRange {
                index,
                len: self.count,
            });
        }
        Ok(self.reader.entries[self.first + index])
    }

    /// The parsed record of dataset index `index`.
    ///
    /// # Errors
    /// `index` out of range or an unreadable record.
    pub fn record(&self, index: usize) -> Result<ImageRecord> {
        let (key, _) = self.entry(index)?;
        self.reader.read_record(key)
    }

    /// Label and decoded image of the record payload `raw` of `key` (at `offset`).
    fn sample_from_raw(&self, key: u64, offset: u64, raw: &[u8]) -> Result<(RgbImage, u32)> {
        let (_, labels, image_start) =
            parse_header(raw).map_err(|what| self.reader.format_err(Some(key), offset, what))?;
        let label = self.label_of(key, offset, &labels)?;
        let image = &raw[image_start..];
        if image.is_empty() {
            return Err(self
                .reader
                .format_err(Some(key), offset, "record holds no image"));
        }
        let img =
            decode_rgb(image).map_err(|what| self.reader.format_err(Some(key), offset, what))?;
        Ok((img, label))
    }

    fn label_of(&self, key: u64, offset: u64, labels: &[f32]) -> Result<u32> {
        let l = labels.first().copied().unwrap_or(f32::NAN);
        if !(l.is_finite() && l >= 0.0 && l.fract() == 0.0 && l < 16_777_216.0) {
            return Err(self.reader.format_err(
                Some(key),
                offset,
                format!("label {l} is not a class id"),
            ));
        }
        Ok(l as u32)
    }
}

impl RecordIoReader {
    /// Find the exact identity-record range from the f32 labels of header record 0: f32 is
    /// exact only to 2^24, so look for the first identity record near the rounded value.
    fn identity_range(&self, labels: &[f32]) -> Result<(u64, u64)> {
        let approx_first = labels[0].max(1.0).round() as u64;
        let approx_end = labels[1].max(0.0).round() as u64;
        // Unreadable records (a truncated file) are not identity records; reading the images
        // reports them.
        let is_identity = |key: u64| {
            self.read_header(key)
                .is_ok_and(|(h, _, image_len)| h.flag >= 2 && image_len == 0)
        };
        let bad = |what: String| Error::Format {
            path: self.rec_path.clone(),
            what: format!("record key 0 (layout A header): {what}"),
        };
        const EXACT: u64 = 1 << 24;
        // Look for the boundary from a little below the header's value: the first identity
        // record met going up is the first identity key.
        let lo = approx_first.saturating_sub(4).max(1);
        let mut found = None;
        for key in lo..=approx_first + 4 {
            if is_identity(key) {
                found = Some(key);
                break;
            }
        }
        let first = match found {
            Some(k) => k,
            // No identity records (some packers leave them out): trust an exact value, as
            // insightface's reader does.
            None if approx_first <= EXACT => approx_first,
            None => {
                return Err(bad(format!(
                    "no identity record near key {approx_first}, and f32 is inexact past 2^24"
                )))
            }
        };
        let end = if approx_end <= EXACT || found.is_none() {
            approx_end
        } else {
            // The identity records run to the last key of the index.
            self.entries.last().map_or(approx_end, |&(k, _)| k + 1)
        };
        if end < first {
            return Err(bad(format!("identity range [{first}, {end}) is empty")));
        }
        Ok((first, end))
    }
}

impl FaceDataset for RecordIoDataset {
    fn len(&self) -> usize {
        self.count
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn label(&self, index: usize) -> Result<u32> {
        let (key, offset) = self.entry(index)?;
        let (_, labels, _) = self.reader.read_header(key)?;
        self.label_of(key, offset, &labels)
    }

    fn image(&self, index: usize) -> Result<RgbImage> {
        self.sample(index).map(|(img, _)| img)
    }

    fn sample(&self, index: usize) -> Result<(RgbImage, u32)> {
        let (key, offset) = self.entry(index)?;
        let raw = self.reader.read_raw(key)?;
        self.sample_from_raw(key, offset, &raw)
    }

    /// The records of a batch in file order: the batch's offsets sorted, records closer than
    /// 64 KiB grouped into spans of at most 4 MiB, each span read with one positioned read
    /// and decoded by one rayon worker (so reads interleave with decoding and memory stays
    /// bounded by the batch); the results come back in the order of `indices`. A record that
    /// does not parse from its span is read again alone, which reports its error exactly as
    /// [`FaceDataset::sample`] does.
    fn samples(&self, indices: &[usize]) -> Vec<Result<(RgbImage, u32)>> {
        let mut out: Vec<Option<Result<(RgbImage, u32)>>> = std::iter::repeat_with(|| None)
            .take(indices.len())
            .collect();
        // (offset, position in `indices`, key)
        let mut sorted = Vec::with_capacity(indices.len());
        for (pos, &i) in indices.iter().enumerate() {
            match self.entry(i) {
                Ok((key, offset)) => sorted.push((offset, pos, key)),
                Err(e) => out[pos] = Some(Err(e)),
            }
        }
        sorted.sort_unstable();
        let mut spans = Vec::new();
        let mut start = 0;
        for j in 1..=sorted.len() {
            if j == sorted.len()
                || sorted[j].0 - sorted[j - 1].0 > SPAN_GAP
                || sorted[j].0 - sorted[start].0 > SPAN_MAX
            {
                spans.push(&sorted[start..j]);
                start = j;
            }
        }
        // The last record of a span has no next offset in the batch: read a little past it.
        let tail = 2 * self.reader.mean_record_len() + 64;
        let done: Vec<(usize, Result<(RgbImage, u32)>)> = spans
            .par_iter()
            .flat_map_iter(|span| {
                let first = span[0].0;
                let last = span[span.len() - 1].0;
                let buf = self.reader.read_span(first, last.saturating_add(tail)).ok();
                span.iter()
                    .map(|&(offset, pos, key)| {
                        let raw = buf.as_deref().and_then(|b| {
                            let rel = usize::try_from(offset - first).ok()?;
                            parse_record(b.get(rel..)?).ok().flatten()
                        });
                        let r = match raw {
                            Some((raw, _)) => self.sample_from_raw(key, offset, &raw),
                            None => self.sample(indices[pos]),
                        };
                        (pos, r)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for (pos, r) in done {
            out[pos] = Some(r);
        }
        out.into_iter()
            .map(|r| r.expect("every position is read or failed"))
            .collect()
    }
}

/// Batch records closer than this are read through in one span rather than seeked past.
const SPAN_GAP: u64 = 64 << 10;
/// The longest span one read covers (memory per worker).
const SPAN_MAX: u64 = 4 << 20;
