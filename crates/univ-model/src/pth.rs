//! Reading PyTorch `.pth` files (a zip archive holding a pickle and the tensor storages)
//! without trusting them: every zip entry's CRC is checked, the pickle is scanned for what it
//! would build before candle's reader runs it (no global is ever executed either way: the
//! reader only records class names), and each tensor's shape and dtype are checked against the
//! length of its storage and the limits before its memory is allocated.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Most values one pickle may build (counting each copy a memo reference makes).
pub const MAX_PICKLE_VALUES: u64 = 50_000_000;
/// Deepest nesting of containers a pickle may build.
pub const MAX_PICKLE_DEPTH: u32 = 256;
/// Largest `data.pkl` accepted (the official U-Net's is 14 kB).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// What one stack entry of the scan stands for.
#[derive(Clone, Copy)]
enum Item {
    Mark,
    Value { size: u64, depth: u32 },
}

/// Simulates a pickle's opcodes on sizes only: each value is the number of objects it holds and
/// its nesting depth. A memo reference copies what it refers to (candle's reader clones memo
/// entries), so a "memo bomb" that doubles a list forty times is found here, in microseconds.
///
/// # Errors
/// A message for a pickle beyond the limits, truncated, or with an opcode the reader does not
/// support.
pub fn scan_pickle(data: &[u8]) -> std::result::Result<(), String> {
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: HashMap<u32, (u64, u32)> = HashMap::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|e| *e <= data.len())
            .ok_or("the pickle ends inside an opcode")?;
        let s = &data[*pos..end];
        *pos = end;
        Ok(s)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let check = |size: u64, depth: u32| -> std::result::Result<(), String> {
        if size > MAX_PICKLE_VALUES {
            return Err(format!(
                "the pickle would build more than {MAX_PICKLE_VALUES} values (shared values \
                 copied over and over: a 'memo bomb')"
            ));
        }
        if depth > MAX_PICKLE_DEPTH {
            return Err(format!(
                "the pickle nests containers deeper than {MAX_PICKLE_DEPTH} levels"
            ));
        }
        Ok(())
    };
    fn pop_value(stack: &mut Vec<Item>) -> std::result::Result<(u64, u32), String> {
        match stack.pop() {
            Some(Item::Value { size, depth }) => Ok((size, depth)),
            _ => Err("the pickle pops from an empty stack".into()),
        }
    }
    fn pop_to_mark(stack: &mut Vec<Item>) -> std::result::Result<(u64, u32), String> {
        let (mut size, mut depth) = (0u64, 0u32);
        loop {
            match stack.pop() {
                Some(Item::Mark) => return Ok((size, depth)),
                Some(Item::Value { size: s, depth: d }) => {
                    size = size.saturating_add(s);
                    depth = depth.max(d);
                }
                None => return Err("the pickle has no mark to pop to".into()),
            }
        }
    }
    let leaf = Item::Value { size: 1, depth: 1 };
    let mut ops = 0u64;
    loop {
        ops += 1;
        if ops > MAX_PICKLE_VALUES {
            return Err(format!(
                "the pickle runs more than {MAX_PICKLE_VALUES} opcodes"
            ));
        }
        let op = take(&mut pos, 1)?[0];
        match op {
            0x80 => {
                take(&mut pos, 1)?;
            }
            b'c' => {
                // GLOBAL: two newline-terminated names, recorded by the reader, never imported.
                for _ in 0..2 {
                    let rest = &data[pos..];
                    let nl = rest
                        .iter()
                        .position(|b| *b == b'\n')
                        .ok_or("the pickle ends inside a global name")?;
                    pos += nl + 1;
                }
                stack.push(leaf);
            }
            b'q' | b'r' => {
                let id = if op == b'q' {
                    u32::from(take(&mut pos, 1)?[0])
                } else {
                    u32_at(take(&mut pos, 4)?)
                };
                match stack.last() {
                    Some(Item::Value { size, depth }) => {
                        memo.insert(id, (*size, *depth));
                    }
                    _ => return Err("the pickle memoizes nothing".into()),
                }
            }
            b'h' | b'j' => {
                let id = if op == b'h' {
                    u32::from(take(&mut pos, 1)?[0])
                } else {
                    u32_at(take(&mut pos, 4)?)
                };
                let (size, depth) = *memo
                    .get(&id)
                    .ok_or_else(|| format!("the pickle refers to a missing memo entry {id}"))?;
                stack.push(Item::Value { size, depth });
            }
            b')' | b']' | b'}' | b'N' | 0x88 | 0x89 => stack.push(leaf),
            b'(' => stack.push(Item::Mark),
            b'X' => {
                let n = u32_at(take(&mut pos, 4)?) as usize;
                take(&mut pos, n)?;
                stack.push(leaf);
            }
            b'J' => {
                take(&mut pos, 4)?;
                stack.push(leaf);
            }
            b'K' => {
                take(&mut pos, 1)?;
                stack.push(leaf);
            }
            b'M' => {
                take(&mut pos, 2)?;
                stack.push(leaf);
            }
            b'G' => {
                take(&mut pos, 8)?;
                stack.push(leaf);
            }
            0x8a => {
                let n = usize::from(take(&mut pos, 1)?[0]);
                take(&mut pos, n)?;
                stack.push(leaf);
            }
            // Containers made from the stack: one more level around what they hold.
            b't' | b'd' => {
                let (s, d) = pop_to_mark(&mut stack)?;
                let (s, d) = (s.saturating_add(1), d + 1);
                check(s, d)?;
                stack.push(Item::Value { size: s, depth: d });
            }
            0x85..=0x87 | b'R' | b'b' | 0x81 | b'Q' => {
                let n = match op {
                    0x85 | b'Q' => 1,
                    0x86 | b'R' | b'b' | 0x81 => 2,
                    _ => 3,
                };
                let (mut s, mut d) = (1u64, 0u32);
                for _ in 0..n {
                    let (si, di) = pop_value(&mut stack)?;
                    s = s.saturating_add(si);
                    d = d.max(di);
                }
                check(s, d + 1)?;
                stack.push(Item::Value {
                    size: s,
                    depth: d + 1,
                });
            }
            // Items added to the container below them.
            b'a' | b's' | b'e' | b'u' => {
                let (s, d) = match op {
                    b'a' => pop_value(&mut stack)?,
                    b's' => {
                        let (v, dv) = pop_value(&mut stack)?;
                        let (k, dk) = pop_value(&mut stack)?;
                        (v.saturating_add(k), dv.max(dk))
                    }
                    _ => pop_to_mark(&mut stack)?,
                };
                match stack.last_mut() {
                    Some(Item::Value { size, depth }) => {
                        *size = size.saturating_add(s);
                        *depth = (*depth).max(d + 1);
                        check(*size, *depth)?;
                    }
                    _ => return Err("the pickle adds items to nothing".into()),
                }
            }
            b'.' => return Ok(()),
            other => {
                return Err(format!(
                    "the pickle uses opcode 0x{other:02x}, which this reader does not support"
                ));
            }
        }
    }
}

/// Checks every entry of a zip archive: declared sizes within `max_bytes` in all, and every
/// CRC (each entry is read to its end, which is when the zip reader checks it).
fn check_zip(path: &Path, max_bytes: u64) -> Result<HashMap<String, u64>> {
    let f = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| bad(path, format!("not a torch zip file: {e}")))?;
    let mut sizes = HashMap::new();
    let mut total = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(path, format!("zip entry {i}: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| bad(path, format!("zip entry {i}: {e}")))?
            .to_string();
        let declared = entry.size();
        total = total.saturating_add(declared);
        if total > max_bytes {
            return Err(bad(
                path,
                format!("its entries hold more than {max_bytes} bytes (the memory limit)"),
            ));
        }
        let mut counted = std::io::sink();
        let got = std::io::copy(&mut (&mut entry).take(declared + 1), &mut counted)
            .map_err(|e| bad(path, format!("{name}: {e}")))?;
        if got != declared {
            return Err(bad(
                path,
                format!("{name}: holds {got} bytes, its header says {declared}"),
            ));
        }
        sizes.insert(name, declared);
    }
    Ok(sizes)
}

/// The state dict of a `.pth` file, after the checks of the module docs: the tensors under
/// the first of `keys` that holds any (`None`: the top level). `max_bytes` bounds the archive
/// and every tensor.
///
/// # Errors
/// [`Error::Checkpoint`] naming the file and what is wrong: a damaged archive or pickle, a
/// tensor larger than its storage, or no state dict under any of the keys.
pub fn read_state_dict(
    path: &Path,
    keys: &[Option<&str>],
    max_bytes: u64,
) -> Result<Vec<(String, Tensor)>> {
    let sizes = check_zip(path, max_bytes)?;
    // The pickles first: scanned before candle's reader builds them.
    let f = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| bad(path, format!("not a torch zip file: {e}")))?;
    for (name, size) in &sizes {
        if !name.ends_with("data.pkl") {
            continue;
        }
        if *size > MAX_PICKLE_BYTES {
            return Err(bad(
                path,
                format!("{name} is {size} bytes, more than {MAX_PICKLE_BYTES}"),
            ));
        }
        let mut bytes = Vec::new();
        zip.by_name(name)
            .map_err(|e| bad(path, format!("{name}: {e}")))?
            .read_to_end(&mut bytes)
            .map_err(|e| bad(path, format!("{name}: {e}")))?;
        scan_pickle(&bytes).map_err(|e| bad(path, format!("{name}: {e}")))?;
    }
    let mut tried = Vec::new();
    for key in keys {
        let place = key.unwrap_or("the top level");
        let pth = match candle_core::pickle::PthTensors::new(path, *key) {
            Ok(p) if !p.tensor_infos().is_empty() => p,
            Ok(_) => {
                tried.push(format!("{place}: no tensors"));
                continue;
            }
            Err(e) if e.to_string().contains("not found") => {
                tried.push(format!("{place}: not there"));
                continue;
            }
            Err(e) => return Err(bad(path, format!("cannot read the state dict: {e}"))),
        };
        return load_all(path, &pth, &sizes, max_bytes);
    }
    Err(bad(
        path,
        format!("no state dict found ({})", tried.join("; ")),
    ))
}

/// Every tensor of `pth`, each checked against its storage's length and the limit first.
fn load_all(
    path: &Path,
    pth: &candle_core::pickle::PthTensors,
    sizes: &HashMap<String, u64>,
    max_bytes: u64,
) -> Result<Vec<(String, Tensor)>> {
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let info = &pth.tensor_infos()[name];
        let elem = info.dtype.size_in_bytes() as u128;
        let need = (info.layout.shape().elem_count() as u128)
            .saturating_add(info.layout.start_offset() as u128)
            .saturating_mul(elem);
        let have = sizes.get(&info.path).copied().unwrap_or(0);
        if need > u128::from(have) {
            return Err(bad(
                path,
                format!(
                    "tensor {name} of shape {:?} ({:?}) needs {need} bytes, its storage {} holds \
                     {have}",
                    info.layout.dims(),
                    info.dtype,
                    info.path
                ),
            ));
        }
        if need > u128::from(max_bytes) {
            return Err(bad(
                path,
                format!("tensor {name} needs {need} bytes, more than the limit of {max_bytes}"),
            ));
        }
        if let Some(t) = pth.get(name).map_err(|e| {
            bad(
                path,
                format!("cannot read the state dict: tensor {name}: {e}"),
            )
        })? {
            out.push((name.clone(), t));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list memoized, then a list of two references to it, memoized, and so on `levels`
    /// times: about 2^levels values once copied.
    fn memo_bomb(levels: u32) -> Vec<u8> {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for i in 0..levels {
            p.extend_from_slice(&[b'(', b'h', i as u8, b'h', i as u8, b't']);
            p.extend_from_slice(&[b'q', (i + 1) as u8]);
        }
        p.push(b'.');
        p
    }

    #[test]
    fn the_scan_finds_memo_bombs_and_deep_nesting() {
        assert!(scan_pickle(&memo_bomb(10)).is_ok());
        let e = scan_pickle(&memo_bomb(44)).unwrap_err();
        assert!(e.contains("memo bomb"), "{e}");
        // 200,000 nested tuples.
        let mut deep = vec![0x80, 2];
        deep.extend(std::iter::repeat_n(b'(', 200_000));
        deep.push(b')');
        deep.extend(std::iter::repeat_n(b't', 200_000));
        deep.push(b'.');
        let e = scan_pickle(&deep).unwrap_err();
        assert!(e.contains("deeper"), "{e}");
        // Truncated, unknown opcode, pops from nothing.
        assert!(scan_pickle(&[0x80, 2, b'X', 9, 0]).is_err());
        assert!(
            scan_pickle(&[0x80, 2, b'i', b'.'])
                .unwrap_err()
                .contains("0x69")
        );
        assert!(scan_pickle(b"a.").is_err());
    }
}
