//! Generation metadata inside image files: PNG text chunks, and EXIF UserComment for JPEG/WebP — written
//! the way A1111 (PIL + piexif) writes them, so A1111-metadata readers see our files as A1111 images.

/// PNG text keyword of the A1111 infotext.
pub const PNG_PARAMETERS_KEY: &str = "parameters";
/// PNG text keyword of our full parameters as JSON.
pub const PNG_SDHOST_KEY: &str = "sd-host";

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
const EXIF_HEADER: &[u8] = b"Exif\0\0";
const TAG_EXIF_IFD: u16 = 0x8769;
const TAG_USER_COMMENT: u16 = 0x9286;
const UNICODE_PREFIX: &[u8] = b"UNICODE\0";
const ASCII_PREFIX: &[u8] = b"ASCII\0\0\0";

/// Whether a PNG tEXt chunk (Latin-1) can hold `s`; otherwise it goes in an iTXt chunk (UTF-8), as PIL does.
pub fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) <= 0xFF)
}

/// A TIFF/EXIF block (no `Exif\0\0` header) holding `text` as UserComment in the Exif sub-IFD.
/// Big-endian with a `UNICODE` UTF-16BE comment, which is what piexif writes for A1111.
pub fn exif_user_comment(text: &str) -> Vec<u8> {
    let mut comment = UNICODE_PREFIX.to_vec();
    for unit in text.encode_utf16() {
        comment.extend_from_slice(&unit.to_be_bytes());
    }
    let exif_ifd_offset: u32 = 8 + 2 + 12 + 4;
    let data_offset: u32 = exif_ifd_offset + 2 + 12 + 4;
    let mut out = Vec::with_capacity(data_offset as usize + comment.len());
    out.extend_from_slice(b"MM\x00\x2a");
    out.extend_from_slice(&8u32.to_be_bytes());
    // IFD0: one entry pointing at the Exif IFD.
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&TAG_EXIF_IFD.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes()); // LONG
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&exif_ifd_offset.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    // Exif IFD: UserComment (UNDEFINED bytes).
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&TAG_USER_COMMENT.to_be_bytes());
    out.extend_from_slice(&7u16.to_be_bytes());
    out.extend_from_slice(&(comment.len() as u32).to_be_bytes());
    out.extend_from_slice(&data_offset.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&comment);
    out
}

struct Tiff<'a> {
    b: &'a [u8],
    big: bool,
}

impl Tiff<'_> {
    fn u16(&self, at: usize) -> Option<u16> {
        let s = self.b.get(at..at + 2)?;
        Some(if self.big {
            u16::from_be_bytes([s[0], s[1]])
        } else {
            u16::from_le_bytes([s[0], s[1]])
        })
    }
    fn u32(&self, at: usize) -> Option<u32> {
        let s = self.b.get(at..at + 4)?;
        let a = [s[0], s[1], s[2], s[3]];
        Some(if self.big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    }
    /// (type, count, offset of the value field) of `tag` in the IFD at `ifd`.
    fn find(&self, ifd: usize, tag: u16) -> Option<(u16, u32, usize)> {
        let n = self.u16(ifd)? as usize;
        for i in 0..n.min(512) {
            let e = ifd + 2 + i * 12;
            if self.u16(e)? == tag {
                return Some((self.u16(e + 2)?, self.u32(e + 4)?, e + 8));
            }
        }
        None
    }
}

/// The UserComment of a TIFF/EXIF block (with or without the `Exif\0\0` header), decoded.
pub fn read_exif_user_comment(exif: &[u8]) -> Option<String> {
    let b = exif.strip_prefix(EXIF_HEADER).unwrap_or(exif);
    let big = match b.get(..2)? {
        b"MM" => true,
        b"II" => false,
        _ => return None,
    };
    let t = Tiff { b, big };
    let ifd0 = t.u32(4)? as usize;
    let (_, _, ptr) = t.find(ifd0, TAG_EXIF_IFD)?;
    let exif_ifd = t.u32(ptr)? as usize;
    let (_, count, field) = t.find(exif_ifd, TAG_USER_COMMENT)?;
    let count = count as usize;
    let data = if count <= 4 {
        b.get(field..field + count)?
    } else {
        let off = t.u32(field)? as usize;
        b.get(off..off.checked_add(count)?)?
    };
    let (prefix, body) = data.split_at(data.len().min(8));
    let text = if prefix == UNICODE_PREFIX {
        let units: Vec<u16> = body
            .chunks_exact(2)
            .map(|c| {
                if big {
                    u16::from_be_bytes([c[0], c[1]])
                } else {
                    u16::from_le_bytes([c[0], c[1]])
                }
            })
            .collect();
        String::from_utf16_lossy(&units)
    } else if prefix == ASCII_PREFIX || prefix == [0u8; 8] {
        String::from_utf8_lossy(body).into_owned()
    } else {
        String::from_utf8_lossy(data).into_owned()
    };
    Some(text.trim_end_matches('\0').to_string())
}

/// Text chunks of a PNG (tEXt, iTXt; zTXt and compressed iTXt through the png decoder), in file order.
pub fn png_text_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if !bytes.starts_with(PNG_SIGNATURE) {
        return out;
    }
    let mut pos = PNG_SIGNATURE.len();
    let mut compressed = false;
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
            as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let Some(data) = pos
            .checked_add(8 + len)
            .and_then(|end| bytes.get(pos + 8..end))
        else {
            break;
        };
        match kind {
            b"tEXt" => {
                if let Some(z) = data.iter().position(|&b| b == 0) {
                    let key: String = data[..z].iter().map(|&b| b as char).collect();
                    let text: String = data[z + 1..].iter().map(|&b| b as char).collect();
                    out.push((key, text));
                }
            }
            b"iTXt" => {
                if let Some(z) = data.iter().position(|&b| b == 0) {
                    let key = String::from_utf8_lossy(&data[..z]).into_owned();
                    let rest = &data[z + 1..];
                    if rest.len() >= 2 && rest[0] == 0 {
                        // language tag and translated keyword, each NUL-terminated
                        let after = &rest[2..];
                        let mut parts = after.splitn(3, |&b| b == 0);
                        let (_lang, _tkey, text) = (parts.next(), parts.next(), parts.next());
                        if let Some(text) = text {
                            out.push((key, String::from_utf8_lossy(text).into_owned()));
                        }
                    } else {
                        compressed = true;
                    }
                }
            }
            b"zTXt" => compressed = true,
            b"IEND" => break,
            _ => {}
        }
        pos += 12 + len;
    }
    if compressed {
        out.extend(png_compressed_text(bytes));
    }
    out
}

/// Compressed text chunks that come before the image data, decompressed by the png crate (with a limit).
fn png_compressed_text(bytes: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let Ok(reader) = decoder.read_info() else {
        return out;
    };
    let info = reader.info();
    for z in &info.compressed_latin1_text {
        let mut z = z.clone();
        if z.decompress_text_with_limit(1 << 20).is_ok() {
            if let Ok(t) = z.get_text() {
                out.push((z.keyword.clone(), t));
            }
        }
    }
    for i in &info.utf8_text {
        if i.compressed {
            let mut i = i.clone();
            if i.decompress_text_with_limit(1 << 20).is_ok() {
                if let Ok(t) = i.get_text() {
                    out.push((i.keyword.clone(), t));
                }
            }
        }
    }
    out
}

/// The EXIF block of a JPEG (APP1 `Exif\0\0`).
fn jpeg_exif(bytes: &[u8]) -> Option<&[u8]> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut pos = 2;
    while pos + 4 <= bytes.len() {
        if bytes[pos] != 0xFF {
            return None;
        }
        let marker = bytes[pos + 1];
        if marker == 0xFF {
            pos += 1;
            continue;
        }
        // Start of scan / end of image: no metadata segments after this point.
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;
        let seg = bytes.get(pos + 4..pos + 2 + len)?;
        if marker == 0xE1 && seg.starts_with(EXIF_HEADER) {
            return Some(&seg[EXIF_HEADER.len()..]);
        }
        pos += 2 + len;
    }
    None
}

/// The EXIF chunk of a WebP (RIFF container).
fn webp_exif(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WEBP" {
        return None;
    }
    let mut pos = 12;
    while pos + 8 <= bytes.len() {
        let kind = &bytes[pos..pos + 4];
        let len = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        let data = bytes.get(pos + 8..(pos + 8).checked_add(len)?)?;
        if kind == b"EXIF" {
            return Some(data);
        }
        pos += 8 + len + (len & 1);
    }
    None
}

/// The A1111 infotext of an image: the PNG `parameters` text, or the EXIF UserComment of a JPEG/WebP.
pub fn read_png_parameters(bytes: &[u8]) -> Option<String> {
    if bytes.starts_with(PNG_SIGNATURE) {
        return png_text_chunks(bytes)
            .into_iter()
            .find(|(k, _)| k == PNG_PARAMETERS_KEY)
            .map(|(_, v)| v);
    }
    let exif = jpeg_exif(bytes).or_else(|| webp_exif(bytes))?;
    read_exif_user_comment(exif).filter(|s| !s.is_empty())
}

/// Our full parameters JSON from a PNG's `sd-host` chunk.
pub fn read_sdhost_params(bytes: &[u8]) -> Option<serde_json::Value> {
    png_text_chunks(bytes)
        .into_iter()
        .find(|(k, _)| k == PNG_SDHOST_KEY)
        .and_then(|(_, v)| serde_json::from_str(&v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exif_user_comment_round_trips_unicode() {
        let text = "a cat, 猫\nSteps: 20, Sampler: Euler";
        let exif = exif_user_comment(text);
        assert_eq!(read_exif_user_comment(&exif).as_deref(), Some(text));
        let mut with_header = EXIF_HEADER.to_vec();
        with_header.extend_from_slice(&exif);
        assert_eq!(read_exif_user_comment(&with_header).as_deref(), Some(text));
    }

    #[test]
    fn garbage_is_not_metadata() {
        assert_eq!(read_png_parameters(b"not an image"), None);
        assert_eq!(read_exif_user_comment(b"MM\0\x2a\xff\xff\xff\xff"), None);
        assert!(png_text_chunks(b"\x89PNG\r\n\x1a\n\0\0\xff\xfftEXt").is_empty());
    }
}
