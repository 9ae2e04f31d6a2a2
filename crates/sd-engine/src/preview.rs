//! Cheap latent → RGB previews: a per-family linear map of the 4 latent channels to RGB,
//! one pixel per latent (1/8 of the image size). No VAE involved.
//!
//! Coefficients (applied to the sampler's latents, i.e. already multiplied by the VAE scaling
//! factor; the result is in roughly -1..1 and mapped to 0..255):
//! - SD 1.x / 2.x (same VAE): the least-squares fit published by Kevin Turner ("keturn") on the
//!   Hugging Face forum thread "Decoding latents to RGB without upscaling" (2022), measured on
//!   SD 1.4; no bias.
//! - SDXL: the fit used for SDXL latent previews in ComfyUI's `latent_formats.py`, with its bias.
//!
//! They are only meant to show composition and rough colour while sampling.

use candle_core::{DType, Tensor};

use crate::{EngineError, Family, Result, RgbImage};

/// `[latent channel][r, g, b]`.
type Factors = [[f32; 3]; 4];

const SD1_FACTORS: Factors = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];
const SD1_BIAS: [f32; 3] = [0.0, 0.0, 0.0];

const SDXL_FACTORS: Factors = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
];
const SDXL_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

fn coefficients(family: Family) -> (&'static Factors, &'static [f32; 3]) {
    match family {
        Family::Sd1 | Family::Sd2 => (&SD1_FACTORS, &SD1_BIAS),
        Family::Sdxl => (&SDXL_FACTORS, &SDXL_BIAS),
    }
}

/// Projects latents `[1, 4, h, w]` or `[4, h, w]` to an `w × h` RGB image.
pub fn latent_to_rgb(family: Family, latents: &Tensor) -> Result<RgbImage> {
    let latents = match latents.rank() {
        4 if latents.dim(0)? == 1 => latents.squeeze(0)?,
        3 => latents.clone(),
        _ => {
            return Err(EngineError::InvalidParam(format!(
                "preview needs latents [1, 4, h, w] or [4, h, w], got {:?}",
                latents.dims()
            )))
        }
    };
    let (c, h, w) = latents.dims3()?;
    if c != 4 || h == 0 || w == 0 {
        return Err(EngineError::InvalidParam(format!(
            "preview needs 4 latent channels and a non-empty size, got {:?}",
            latents.dims()
        )));
    }
    // Pixel-major [h·w, 4] so each pixel's latent vector is one contiguous row.
    let pixels: Vec<f32> = latents
        .to_dtype(DType::F32)?
        .reshape((c, h * w))?
        .t()?
        .flatten_all()?
        .to_vec1()?;
    let (factors, bias) = coefficients(family);
    let mut data = Vec::with_capacity(h * w * 3);
    for lat in pixels.chunks_exact(4) {
        for (ch, &b) in bias.iter().enumerate() {
            let v = b + lat.iter().zip(factors).map(|(x, f)| x * f[ch]).sum::<f32>();
            // -1..1 → 0..255; NaN maps to 0.
            let byte = ((v + 1.0) * 127.5).round().clamp(0.0, 255.0);
            data.push(if byte.is_nan() { 0 } else { byte as u8 });
        }
    }
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        data,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn latents(shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(f).collect::<Vec<_>>(), shape, &Device::Cpu).expect("t")
    }

    #[test]
    fn size_is_latent_size() {
        let l = latents(&[1, 4, 6, 10], |i| (i as f32 * 0.37).sin());
        let img = latent_to_rgb(Family::Sd1, &l).expect("preview");
        assert_eq!((img.width, img.height, img.data.len()), (10, 6, 180));
        let img = latent_to_rgb(Family::Sdxl, &l.squeeze(0).expect("sq")).expect("preview");
        assert_eq!((img.width, img.height), (10, 6));
    }

    #[test]
    fn different_latents_differ_and_values_follow_the_projection() {
        let a = latents(&[4, 8, 8], |i| (i as f32 * 0.11).sin());
        let b = latents(&[4, 8, 8], |i| (i as f32 * 0.23).cos());
        for fam in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            let pa = latent_to_rgb(fam, &a).expect("a");
            let pb = latent_to_rgb(fam, &b).expect("b");
            assert_ne!(pa.data, pb.data);
        }
        // Zero latents give mid grey for SD 1.x (no bias) and a tinted grey for SDXL.
        let zero = latents(&[4, 2, 2], |_| 0.0);
        let sd1 = latent_to_rgb(Family::Sd1, &zero).expect("zero");
        assert!(sd1.data.iter().all(|&v| v == 128));
        let xl = latent_to_rgb(Family::Sdxl, &zero).expect("zero");
        assert_eq!(&xl.data[..3], &[141, 125, 127]);
        // Channel 0 alone at +1 gives (1 + factors[0]) * 127.5 for SD 1.x.
        let one = latents(&[4, 1, 1], |i| if i == 0 { 1.0 } else { 0.0 });
        let p = latent_to_rgb(Family::Sd1, &one).expect("one");
        assert_eq!(p.data, vec![165, 154, 154]);
        // Large values clamp instead of wrapping.
        let big = latents(&[4, 1, 1], |_| 100.0);
        assert!(latent_to_rgb(Family::Sd1, &big).is_ok());
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(latent_to_rgb(Family::Sd1, &latents(&[3, 4, 4], |_| 0.0)).is_err());
        assert!(latent_to_rgb(Family::Sd1, &latents(&[2, 4, 4, 4], |_| 0.0)).is_err());
        assert!(latent_to_rgb(Family::Sd1, &latents(&[4, 4], |_| 0.0)).is_err());
    }
}
