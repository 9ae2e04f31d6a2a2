//! A diffusers pipeline folder loads to the same model as the single file it was converted
//! from. The folder in tests/fixtures/diffusers_folder/sd1 was written by diffusers itself
//! (`from_single_file` on the tiny SD 1.x checkpoint with seed 5, then `save_pretrained`; see
//! tools/fixtures/make_diffusers_folder_fixture.py), so this checks the engine's
//! diffusers → LDM name mapping against diffusers' own converter.
//!
//! More families (kept out of the repository for size: SD 2.x 17 MB, SDXL 35 MB) are checked
//! when `SD_ENGINE_DIFFUSERS_FOLDERS` names a folder holding `sd2/` and/or `sdxl/` written by
//! the same script with `--out`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_engine::checkpoint::{self, Checkpoint};
use sd_engine::models::unet::sdxl_vector;
use sd_engine::pipeline::CpuEngine;
use sd_engine::text::conditioning::ChunkEncoder;
use sd_engine::tiny::write_tiny_checkpoint;
use sd_engine::{Backend, Control, Family, GenerateParams, RgbImage};

/// Seed the fixture script writes its tiny checkpoints with.
const TINY_SEED: u64 = 5;

fn folders() -> Vec<(Family, PathBuf)> {
    let mut v = vec![(
        Family::Sd1,
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers_folder/sd1"),
    )];
    if let Some(extra) = std::env::var_os("SD_ENGINE_DIFFUSERS_FOLDERS") {
        for fam in [Family::Sd2, Family::Sdxl] {
            let p = Path::new(&extra).join(fam.as_str());
            if p.is_dir() {
                v.push((fam, p));
            }
        }
    }
    v
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let scale = want
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .expect("scale")
        .max(1e-6);
    let diff = (got - want)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("diff");
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max diff {diff} (scale {scale})"
    );
}

fn generate(path: &Path) -> (sd_engine::CheckpointInfo, Vec<RgbImage>) {
    let mut e = CpuEngine::new();
    let info = e.load_checkpoint(path).expect("load");
    let p = GenerateParams {
        prompt: "a (photo:1.2) of a cat".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 5.0,
        scheduler: "Euler".into(),
        seed: 42,
        ..Default::default()
    };
    let imgs = e
        .generate(&p, &mut |_| Control::Continue)
        .expect("generate");
    (info, imgs)
}

fn check_networks(fam: Family, a: &Checkpoint, b: &Checkpoint) {
    let dev = Device::Cpu;
    let (ha, pa) = a.text.encode_chunk(&[320, 1125, 539], 1).expect("text a");
    let (hb, pb) = b.text.encode_chunk(&[320, 1125, 539], 1).expect("text b");
    assert_close("hidden", &ha, &hb);
    assert_eq!(pa.is_some(), pb.is_some());
    if let (Some(pa), Some(pb)) = (&pa, &pb) {
        assert_close("pooled", pa, pb);
    }
    let cfg = b.unet.config();
    let x = Tensor::randn(0f32, 1.0, (1, cfg.in_channels, 8, 8), &dev).expect("x");
    let t = Tensor::new(&[500f32], &dev).expect("t");
    let ctx = hb.unsqueeze(0).expect("ctx");
    let y = pb
        .map(|p| sdxl_vector(&p.unsqueeze(0).expect("p"), (64, 64), (0, 0), (64, 64)).expect("y"));
    let ua = a.unet.forward(&x, &t, &ctx, y.as_ref()).expect("unet a");
    let ub = b.unet.forward(&x, &t, &ctx, y.as_ref()).expect("unet b");
    assert_close(&format!("{fam:?} unet"), &ua, &ub);
    let z = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev)
        .and_then(|z| z.to_dtype(DType::F32))
        .expect("z");
    let da = a.vae.decode(&z).expect("vae a");
    let db = b.vae.decode(&z).expect("vae b");
    assert_close(&format!("{fam:?} vae"), &da, &db);
}

#[test]
fn folder_matches_single_file() {
    let dir = tempfile::tempdir().expect("tmp");
    for (fam, folder) in folders() {
        let single = dir.path().join(format!("{}.safetensors", fam.as_str()));
        write_tiny_checkpoint(fam, false, TINY_SEED, &single).expect("write");

        let a = checkpoint::load(&folder).expect("load folder");
        let b = checkpoint::load(&single).expect("load file");
        assert_eq!(format!("{:?}", a.info), format!("{:?}", b.info));
        assert!(a.source().is_none(), "LoRA is not offered on folders");
        check_networks(fam, &a, &b);
        drop((a, b));

        let (ia, imgs_a) = generate(&folder);
        let (ib, imgs_b) = generate(&single);
        assert_eq!(format!("{ia:?}"), format!("{ib:?}"));
        assert_eq!(imgs_a.len(), imgs_b.len());
        for (x, y) in imgs_a.iter().zip(&imgs_b) {
            assert_eq!((x.width, x.height), (64, 64));
            assert!(
                x.data == y.data,
                "{fam:?}: folder and single-file images differ"
            );
        }
        eprintln!("{fam:?}: folder and single file agree");

        // A separate VAE is refused on a folder (its own could not be read back afterwards).
        let vae = dir.path().join(format!("{}_vae.safetensors", fam.as_str()));
        sd_engine::tiny::write_tiny_vae(fam, 3, &vae).expect("vae");
        let mut e = CpuEngine::new();
        e.load_checkpoint(&folder).expect("load");
        assert!(e.set_vae(Some(&vae)).is_err());
        assert!(e.vae().is_none());
        assert!(e.set_vae(None).is_ok(), "its own VAE is already in use");
    }
}

/// The folder's `vae/diffusion_pytorch_model.safetensors` (diffusers names, written by diffusers)
/// used as a standalone VAE on the single-file checkpoint it was made from decodes exactly like
/// the checkpoint's own VAE.
#[test]
fn a_diffusers_layout_vae_file_works_as_a_standalone_vae() {
    let dir = tempfile::tempdir().expect("tmp");
    let (fam, folder) = folders().remove(0);
    let single = dir.path().join("single.safetensors");
    write_tiny_checkpoint(fam, false, TINY_SEED, &single).expect("write");
    let vae_file = folder.join("vae/diffusion_pytorch_model.safetensors");
    let p = GenerateParams {
        prompt: "a cat".into(),
        width: 64,
        height: 64,
        steps: 2,
        scheduler: "Euler".into(),
        seed: 9,
        ..Default::default()
    };
    let mut e = CpuEngine::new();
    e.load_checkpoint(&single).expect("load");
    let own = e.generate(&p, &mut |_| Control::Continue).expect("own");
    e.set_vae(Some(&vae_file))
        .expect("diffusers-layout VAE loads");
    assert_eq!(e.vae(), Some(vae_file.as_path()));
    let with = e.generate(&p, &mut |_| Control::Continue).expect("with");
    assert!(with[0].data == own[0].data, "same weights, same decode");
    // A file with other weights under the same names does change the image.
    let other = dir.path().join("other_vae.safetensors");
    sd_engine::tiny::write_tiny_vae(fam, 99, &other).expect("vae");
    e.set_vae(Some(&other)).expect("ldm vae");
    let changed = e.generate(&p, &mut |_| Control::Continue).expect("other");
    assert!(changed[0].data != own[0].data);
}

#[test]
fn folder_variants_and_v_prediction() {
    let src = &folders()[0].1;
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("pipe");
    // Copy with the `.fp16` variant names, and mark the scheduler v-prediction.
    for sub in ["unet", "vae", "text_encoder", "scheduler"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        for e in std::fs::read_dir(src.join(sub)).expect("read") {
            let e = e.expect("entry");
            let name = e.file_name().to_string_lossy().to_string();
            let to = name.replace(".safetensors", ".fp16.safetensors");
            std::fs::copy(e.path(), root.join(sub).join(to)).expect("copy");
        }
    }
    std::fs::copy(src.join("model_index.json"), root.join("model_index.json")).expect("copy");
    let sched = root.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sched).expect("sched");
    std::fs::write(&sched, text.replace("\"epsilon\"", "\"v_prediction\"")).expect("write");
    let ck = checkpoint::load(&root).expect("fp16 variant");
    assert!(ck.info.v_prediction);
    assert_eq!(ck.info.family, Family::Sd1);

    // Pickle-only component: refused as unsafe, never read.
    let unet = root.join("unet");
    for e in std::fs::read_dir(&unet).expect("read") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            std::fs::rename(&p, unet.join("diffusion_pytorch_model.bin")).expect("rename");
        }
    }
    let err = checkpoint::load(&root).expect_err("pickle");
    assert!(
        matches!(err, sd_engine::EngineError::UnsafeFormat(_)),
        "{err}"
    );

    // A folder that is no pipeline.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    assert!(checkpoint::load(&empty).is_err());
}
