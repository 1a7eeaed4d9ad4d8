//! A walk over a DICOM file's element structure before dicom-rs parses it: every declared
//! value length must fit in the bytes that remain (within its enclosing item or sequence),
//! undefined lengths only where the standard allows them (sequences, items, encapsulated pixel
//! data), and sequences nest at most [`MAX_DEPTH`] deep.
//!
//! dicom-rs reserves (and for some values zero-fills) a value's declared length before it
//! reads it, so a few-kilobyte file declaring a 4 GiB element costs 4 GiB of memory; deep
//! nesting recurses without bound. Nothing here allocates more than the file's own size (a
//! deflated data set is inflated within the limit first); values are skipped, not read.

use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// Deepest nesting of sequences accepted (real files rarely go past 5).
pub const MAX_DEPTH: usize = 64;

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);

#[derive(Clone, Copy, PartialEq)]
enum Syntax {
    ExplicitLittle,
    ImplicitLittle,
    ExplicitBig,
}

struct Walker<R> {
    r: R,
    syntax: Syntax,
}

type Res<T> = std::result::Result<T, String>;

/// An element header: tag (group, element), VR when explicit, value length.
type Header = ((u16, u16), Option<[u8; 2]>, u32);

/// Checks the structure of the DICOM file at `path`, whose data set (inflated when deflated)
/// may take at most `max_bytes`. Files without the `DICM` marker are left to dicom-rs (which
/// refuses them).
pub fn check_file(path: &Path, max_bytes: u64) -> Res<()> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut w = Walker {
        r: std::io::BufReader::new(f),
        syntax: Syntax::ExplicitLittle,
    };
    let mut magic = [0u8; 132];
    if len < 132 || w.r.read_exact(&mut magic).is_err() || &magic[128..] != b"DICM" {
        return Ok(());
    }
    let ts = w.meta_group(len)?;
    let ts = ts.trim_end_matches(['\0', ' ']);
    match ts {
        "1.2.840.10008.1.2" => w.syntax = Syntax::ImplicitLittle,
        "1.2.840.10008.1.2.2" => w.syntax = Syntax::ExplicitBig,
        _ => {}
    }
    if ts == "1.2.840.10008.1.2.1.99" {
        // Deflated explicit VR little endian: inflate (within the limit), then walk that.
        let mut data = Vec::new();
        let read = flate2::read::DeflateDecoder::new(&mut w.r)
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| format!("the deflated data set cannot be inflated: {e}"))?;
        if read as u64 > max_bytes {
            return Err(format!(
                "the deflated data set inflates to more than {max_bytes} bytes (the memory limit)"
            ));
        }
        let end = data.len() as u64;
        let mut inner = Walker {
            r: Cursor::new(data),
            syntax: Syntax::ExplicitLittle,
        };
        return inner.data_set(end, 0, false).map(|_| ());
    }
    w.data_set(len, 0, false).map(|_| ())
}

impl<R: Read + Seek> Walker<R> {
    fn pos(&mut self) -> Res<u64> {
        self.r.stream_position().map_err(|e| e.to_string())
    }

    fn bytes<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| "the file ends inside an element header".to_string())?;
        Ok(b)
    }

    fn u16(&mut self, big: bool) -> Res<u16> {
        let b = self.bytes::<2>()?;
        Ok(if big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self, big: bool) -> Res<u32> {
        let b = self.bytes::<4>()?;
        Ok(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn skip(&mut self, n: u64) -> Res<()> {
        let n = i64::try_from(n).map_err(|_| "a value too long to skip".to_string())?;
        self.r
            .seek(SeekFrom::Current(n))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The file meta group (explicit VR little endian, group 0002): checked like any data
    /// set; returns the Transfer Syntax UID.
    fn meta_group(&mut self, end: u64) -> Res<String> {
        let mut ts = String::new();
        loop {
            let at = self.pos()?;
            if at + 2 > end {
                return Ok(ts);
            }
            let group = self.u16(false)?;
            self.r
                .seek(SeekFrom::Start(at))
                .map_err(|e| e.to_string())?;
            if group != 0x0002 {
                return Ok(ts);
            }
            let (tag, _, len) = self.header(Syntax::ExplicitLittle)?;
            let remain = end.saturating_sub(self.pos()?);
            if len == UNDEFINED || u64::from(len) > remain {
                return Err(too_long(tag, len, remain));
            }
            if tag == (0x0002, 0x0010) && len <= 64 {
                let mut b = vec![0u8; len as usize];
                self.r
                    .read_exact(&mut b)
                    .map_err(|e| format!("the transfer syntax cannot be read: {e}"))?;
                ts = String::from_utf8_lossy(&b).into_owned();
            } else {
                self.skip(u64::from(len))?;
            }
        }
    }

    /// An element header in `syntax`: tag, VR (when explicit) and value length.
    fn header(&mut self, syntax: Syntax) -> Res<Header> {
        let big = syntax == Syntax::ExplicitBig;
        let tag = (self.u16(big)?, self.u16(big)?);
        // Items and delimiters carry no VR in any syntax.
        if tag.0 == 0xFFFE || syntax == Syntax::ImplicitLittle {
            return Ok((tag, None, self.u32(big)?));
        }
        let mut vr = self.bytes::<2>()?;
        // As dicom-rs reads it: an unknown VR is UN; these VRs have a 2-byte length, every
        // other one 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
        if VR::from_binary(vr).is_none() {
            vr = *b"UN";
        }
        let short = matches!(
            &vr,
            b"AE"
                | b"AS"
                | b"AT"
                | b"CS"
                | b"DA"
                | b"DS"
                | b"DT"
                | b"FL"
                | b"FD"
                | b"IS"
                | b"LO"
                | b"LT"
                | b"PN"
                | b"SH"
                | b"SL"
                | b"SS"
                | b"ST"
                | b"TM"
                | b"UI"
                | b"UL"
                | b"US"
        );
        let len = if short {
            u32::from(self.u16(big)?)
        } else {
            self.bytes::<2>()?;
            self.u32(big)?
        };
        Ok((tag, Some(vr), len))
    }

    /// Elements up to `end` (or, in an item of undefined length, up to its delimiter when
    /// `delimited`); returns whether a delimiter ended it.
    fn data_set(&mut self, end: u64, depth: usize, delimited: bool) -> Res<bool> {
        while self.pos()? < end {
            let (tag, vr, len) = self.header(self.syntax)?;
            let remain = end.saturating_sub(self.pos()?);
            if tag == ITEM_END {
                if !delimited {
                    return Err("an item delimiter outside an item".into());
                }
                return Ok(true);
            }
            if tag.0 == 0xFFFE {
                return Err(format!(
                    "({:04X},{:04X}) where an element was expected",
                    tag.0, tag.1
                ));
            }
            let is_sequence = match vr {
                Some(v) => &v == b"SQ" || (&v == b"UN" && len == UNDEFINED),
                None => {
                    len == UNDEFINED
                        || matches!(
                            StandardDataDictionary
                                .by_tag(Tag(tag.0, tag.1))
                                .map(|e| e.vr()),
                            Some(VirtualVr::Exact(VR::SQ))
                        )
                }
            };
            if is_sequence {
                if depth >= MAX_DEPTH {
                    return Err(format!("sequences nest more than {MAX_DEPTH} deep"));
                }
                // A UN sequence of undefined length is encoded implicit VR little endian.
                let saved = self.syntax;
                if vr.is_some_and(|v| &v == b"UN") {
                    self.syntax = Syntax::ImplicitLittle;
                }
                let r = self.sequence(tag, len, remain, depth + 1);
                self.syntax = saved;
                r?;
            } else if len == UNDEFINED {
                if tag == PIXEL_DATA && vr.is_some_and(|v| &v == b"OB" || &v == b"OW") {
                    self.fragments(end)?;
                } else {
                    return Err(format!(
                        "element ({:04X},{:04X}) has an undefined length, which only sequences \
                         and encapsulated pixel data may have",
                        tag.0, tag.1
                    ));
                }
            } else if u64::from(len) > remain {
                return Err(too_long(tag, len, remain));
            } else {
                self.skip(u64::from(len))?;
            }
        }
        if delimited {
            return Err("an item of undefined length has no delimiter".into());
        }
        Ok(false)
    }

    /// The items of a sequence: within `len` bytes, or up to its delimiter.
    fn sequence(&mut self, tag: (u16, u16), len: u32, remain: u64, depth: usize) -> Res<()> {
        let end = if len == UNDEFINED {
            self.pos()? + remain
        } else if u64::from(len) > remain {
            return Err(too_long(tag, len, remain));
        } else {
            self.pos()? + u64::from(len)
        };
        while self.pos()? < end {
            let big = self.syntax == Syntax::ExplicitBig;
            let item = (self.u16(big)?, self.u16(big)?);
            let item_len = self.u32(big)?;
            let remain = end.saturating_sub(self.pos()?);
            if item == SEQUENCE_END {
                return if len == UNDEFINED {
                    Ok(())
                } else {
                    Err("a sequence delimiter in a sequence of defined length".into())
                };
            }
            if item != ITEM {
                return Err(format!(
                    "({:04X},{:04X}) inside sequence ({:04X},{:04X}), where an item was expected",
                    item.0, item.1, tag.0, tag.1
                ));
            }
            if item_len == UNDEFINED {
                self.data_set(end, depth, true)?;
            } else if u64::from(item_len) > remain {
                return Err(too_long(item, item_len, remain));
            } else {
                let item_end = self.pos()? + u64::from(item_len);
                self.data_set(item_end, depth, false)?;
            }
        }
        if len == UNDEFINED {
            return Err(format!(
                "sequence ({:04X},{:04X}) of undefined length has no delimiter",
                tag.0, tag.1
            ));
        }
        Ok(())
    }

    /// Encapsulated pixel data: items of defined length up to the sequence delimiter.
    fn fragments(&mut self, end: u64) -> Res<()> {
        loop {
            let big = self.syntax == Syntax::ExplicitBig;
            let item = (self.u16(big)?, self.u16(big)?);
            let len = self.u32(big)?;
            let remain = end.saturating_sub(self.pos()?);
            if item == SEQUENCE_END {
                return Ok(());
            }
            if item != ITEM || len == UNDEFINED {
                return Err("encapsulated pixel data holds something other than fragments".into());
            }
            if u64::from(len) > remain {
                return Err(too_long(item, len, remain));
            }
            self.skip(u64::from(len))?;
        }
    }
}

fn too_long(tag: (u16, u16), len: u32, remain: u64) -> String {
    if len == UNDEFINED {
        return format!(
            "element ({:04X},{:04X}) has an undefined length",
            tag.0, tag.1
        );
    }
    format!(
        "element ({:04X},{:04X}) declares {len} bytes, but only {remain} remain",
        tag.0, tag.1
    )
}
