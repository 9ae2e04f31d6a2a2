#!/usr/bin/env python3
"""Side-by-side timing of SD-Host's engine and diffusers (PyTorch, CPU) on the same architecture.

Both sides build the full-size networks of a family (UNet, VAE and text encoder(s)) with random
weights -- weight values do not change the arithmetic -- at the same resolution and thread count,
and time: text encoding (prompt + negative), one UNet step with classifier-free guidance (batch 2,
median of N after a warm-up), one VAE decode (after a warm-up decode) and the process's peak RSS.
Runs alternate (diffusers, ours, ours, diffusers, ...) so slow drifts in machine load hit both
sides; the table shows the median of each figure over the runs and the ratio ours / diffusers.

Not part of CI. Needs network access the first time (pip) unless --venv points at a ready venv.

Usage:
  bench/compare_diffusers.py [--family sd1|sd2|sdxl] [--res 256] [--threads 2] [--runs 3]
      [--iters 3] [--venv /var/tmp/sd-host-bench-venv] [--ours-cmd "sd-host bench"]
      [--no-vae-warmup] [--json-out FILE] [--record bench/RESULTS.md [--machine TEXT]]

--ours-cmd is split like a shell line; `--family F --res R --iters N --steps 0 --json` are
appended. Default: `sd-host bench` through cargo (release build). The engine's example binary
(`cargo run --release -q -p sd-engine --example bench --`) takes the same flags and builds faster.
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV = "/var/tmp/sd-host-bench-venv"
DEFAULT_OURS = "cargo run --release -q -p sd-host -- bench"

# The diffusers side, run inside the venv. Same architectures as the engine's BenchSize::Full:
# diffusers' configs of SD 1.5, SD 2.x and SDXL base, transformers' CLIP text models.
PEER = textwrap.dedent(
    r'''
    import json, resource, sys, time
    fam, res, iters, threads, vae_warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    import torch
    from diffusers import UNet2DConditionModel, AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    log = lambda m: print("[diffusers] " + m, file=sys.stderr, flush=True)

    unet_common = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2)
    sd15 = dict(block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8)
    sd2 = dict(sd15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
               use_linear_projection=True)
    sdxl = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
    vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4)
    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                  projection_dim=768)
    # diffusers' SD 2.x / SDXL text encoders as the converted checkpoints configure them.
    clip_h = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                  projection_dim=512)
    clip_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                  projection_dim=1280)

    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**dict(unet_common, **{"sd1": sd15, "sd2": sd2, "sdxl": sdxl}[fam])).eval()
    vae = AutoencoderKL(**vae_cfg).eval()
    if fam == "sd1":
        encoders = [CLIPTextModel(CLIPTextConfig(**clip_l)).eval()]
    elif fam == "sd2":
        encoders = [CLIPTextModel(CLIPTextConfig(**clip_h)).eval()]
    else:
        encoders = [CLIPTextModel(CLIPTextConfig(**clip_l)).eval(),
                    CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)).eval()]
    load_s = time.perf_counter() - t0
    count = lambda m: sum(p.numel() for p in m.parameters())
    out = {"peer": "diffusers", "torch": torch.__version__, "family": fam, "res": res,
           "threads": torch.get_num_threads(), "load_s": load_s,
           "unet_params": count(unet), "vae_params": count(vae),
           "text_params": sum(count(e) for e in encoders)}
    log(f"built in {load_s:.1f} s")

    ids = torch.full((1, 77), 49407, dtype=torch.long)
    ids[0, :16] = torch.arange(49406 - 15, 49407)  # BOS-ish prefix of real token ids
    def encode():
        # diffusers' encode_prompt: prompt and negative prompt, one encoder call each.
        hs = []
        for _ in range(2):
            parts = []
            for e in encoders:
                o = e(ids, output_hidden_states=fam != "sd1")
                parts.append(o.last_hidden_state if fam == "sd1" else o.hidden_states[-2])
            hs.append(torch.cat(parts, -1))
        return torch.cat(hs, 0)

    lat = res // 8
    with torch.inference_mode():
        encode()
        t = time.perf_counter(); ctx = encode(); out["text_encode_s"] = time.perf_counter() - t
        log(f"text encode {out['text_encode_s']:.3f} s")
        x = torch.randn(2, 4, lat, lat)
        ts = torch.tensor([500, 500])
        extra = {}
        if fam == "sdxl":
            extra = dict(added_cond_kwargs={"text_embeds": torch.randn(2, 1280),
                                            "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=torch.float32)})
        t = time.perf_counter(); unet(x, ts, ctx, **extra); log(f"UNet warm-up {time.perf_counter() - t:.3f} s")
        times, cpu = [], []
        for i in range(max(iters, 1)):
            t, c = time.perf_counter(), time.process_time()
            unet(x, ts, ctx, **extra)
            times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
            log(f"UNet step {i + 1}: {times[-1]:.3f} s")
        out["unet_step_s_all"] = times
        out["unet_step_s_median"] = sorted(times)[len(times) // 2]
        out["unet_step_cpu_s_median"] = sorted(cpu)[len(cpu) // 2]
        out["peak_rss_after_unet_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del x, ctx
        z = torch.randn(1, 4, lat, lat)
        if vae_warmup:
            vae.decode(z)
        t, c = time.perf_counter(), time.process_time()
        vae.decode(z)
        out["vae_decode_s"] = time.perf_counter() - t; out["vae_decode_cpu_s"] = time.process_time() - c
        log(f"VAE decode {out['vae_decode_s']:.3f} s")
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
    '''
)

FIGURES = [
    # (key, label, unit scale, unit)
    ("text_encode_s", "text encode", 1.0, "s"),
    ("unet_step_s_median", "UNet step (batch 2)", 1.0, "s"),
    ("vae_decode_s", "VAE decode", 1.0, "s"),
    ("unet_step_cpu_s_median", "UNet step CPU", 1.0, "s"),
    ("vae_decode_cpu_s", "VAE decode CPU", 1.0, "s"),
    ("peak_rss_bytes", "peak RSS", 1e-9, "GB"),
]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def ensure_venv(venv, torch_index):
    py = venv_python(venv)
    probe = [py, "-c", "import torch, diffusers, transformers"]
    if os.path.exists(py) and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    log(f"creating venv with torch + diffusers + transformers in {venv} (several GB, minutes)")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    torch_cmd = [py, "-m", "pip", "install", "-q", "torch"]
    if torch_index:
        torch_cmd += ["--index-url", torch_index]
    subprocess.run(torch_cmd, check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "diffusers", "transformers", "safetensors"],
                   check=True)
    subprocess.run(probe, check=True)
    return py


def load_avg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in output:\n" + text[-2000:])


def run_peer(py, peer_file, a):
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    cmd = [py, peer_file, a.family, str(a.res), str(a.iters), str(a.threads),
           "0" if a.no_vae_warmup else "1"]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"diffusers run failed ({p.returncode})")
    return last_json_line(p.stdout)


def run_ours(a):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    cmd = shlex.split(a.ours_cmd) + ["--family", a.family, "--res", str(a.res),
                                     "--iters", str(a.iters), "--steps", "0", "--json"]
    if a.no_vae_warmup:
        cmd.append("--no-vae-warmup")
    p = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=None, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ours failed ({p.returncode}): {' '.join(cmd)}")
    return last_json_line(p.stdout)


def git_commit():
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine():
    model, cores, mem = "?", os.cpu_count() or 0, 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return f"{model}, {cores} cores, {mem:.0f} GB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="runs per side (alternating)")
    ap.add_argument("--iters", type=int, default=3, help="timed UNet steps per run")
    ap.add_argument("--venv", default=DEFAULT_VENV)
    ap.add_argument("--torch-index", default=None,
                    help="pip index for torch (e.g. https://download.pytorch.org/whl/cpu); default PyPI")
    ap.add_argument("--ours-cmd", default=DEFAULT_OURS)
    ap.add_argument("--no-vae-warmup", action="store_true")
    ap.add_argument("--json-out", default=None, help="write all runs and medians here")
    ap.add_argument("--record", default=None, help="append rows to this RESULTS.md")
    ap.add_argument("--machine", default=None, help="machine text for --record")
    ap.add_argument("--note", default="", help="extra note for --record rows")
    ap.add_argument("--commit", default=None, help="commit for --record (default: git HEAD here)")
    a = ap.parse_args()

    py = ensure_venv(a.venv, a.torch_index)
    if a.ours_cmd == DEFAULT_OURS:
        log("building sd-host (release)")
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "sd-host"], cwd=REPO, check=True)
    with tempfile.NamedTemporaryFile("w", suffix="_peer.py", delete=False) as f:
        f.write(PEER)
        peer_file = f.name

    runs = {"ours": [], "diffusers": []}
    loads = []
    try:
        for i in range(a.runs):
            order = ["diffusers", "ours"] if i % 2 == 0 else ["ours", "diffusers"]
            for side in order:
                loads.append(load_avg())
                log(f"run {i + 1}/{a.runs}: {side} (load {loads[-1]})")
                r = run_peer(py, peer_file, a) if side == "diffusers" else run_ours(a)
                r["load_before"] = loads[-1]
                runs[side].append(r)
    finally:
        os.unlink(peer_file)
    loads.append(load_avg())

    def med_of(rs, k):
        vals = [r[k] for r in rs if r.get(k) is not None]
        return statistics.median(vals) if vals else float("nan")

    med = {side: {k: med_of(rs, k) for k, *_ in FIGURES} for side, rs in runs.items()}
    print(f"\n{a.family} {a.res}x{a.res}, {a.threads} threads, median of {a.runs} alternating runs "
          f"(load averages seen: {loads[0]} .. {loads[-1]})")
    print(f"{'figure':<22}{'ours':>12}{'diffusers':>12}{'ours/diffusers':>16}")
    rows = []
    for key, label, scale, unit in FIGURES:
        o, d = med["ours"][key] * scale, med["diffusers"][key] * scale
        ratio = o / d if d else float("nan")
        rows.append((label, unit, o, d, ratio))
        print(f"{label + ' (' + unit + ')':<22}{o:>12.3f}{d:>12.3f}{ratio:>16.2f}")
    for side in ("ours", "diffusers"):
        print(f"{side} UNet steps per run: " +
              ", ".join("[" + ", ".join(f"{t:.2f}" for t in r["unet_step_s_all"]) + "]"
                        for r in runs[side]))

    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"family": a.family, "res": a.res, "threads": a.threads, "runs": runs,
                       "median": med, "loads": loads}, f, indent=1)
    if a.record:
        date = datetime.date.today().isoformat()
        mach = a.machine or machine()
        commit = a.commit or git_commit()
        note = f"median of {a.runs} alternating runs; load {loads[0]} .. {loads[-1]}"
        if a.note:
            note += "; " + a.note
        with open(a.record, "a") as f:
            for label, unit, o, d, ratio in rows:
                f.write(f"| {date} | {mach} | {commit} | {a.family} | {a.res} | {a.threads} | "
                        f"{label} ({unit}) | {o:.3f} | {d:.3f} | {ratio:.2f} | {note} |\n")
        log(f"appended {len(rows)} rows to {a.record}")


if __name__ == "__main__":
    main()
