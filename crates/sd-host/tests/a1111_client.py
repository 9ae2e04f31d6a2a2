"""The real `webuiapi` client (PyPI) against a running SD-Host: usage `a1111_client.py BASE_URL [KEY]`
where BASE_URL ends in /sdapi/v1 and KEY, if given, is an API key sent the way A1111's `--api-auth`
clients do (HTTP Basic). Exits non-zero on the first failed check. Driven by tests/a1111.rs."""

import sys
import threading
import time

import webuiapi


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def main():
    base = sys.argv[1]
    api = webuiapi.WebUIApi(baseurl=base, sampler="Euler a", steps=2)
    if len(sys.argv) > 2:
        r = api.session.get(f"{base}/sd-models")
        check(r.status_code == 401, f"refused without credentials: {r.status_code}")
        api.set_auth("webui", sys.argv[2])

    models = api.get_sd_models()
    titles = sorted(m["title"] for m in models)
    check(len(titles) == 2, f"get_sd_models lists the two checkpoints: {titles}")
    check(all(m["sha256"] and len(m["hash"]) == 10 for m in models), "models carry hashes")
    check(titles[1].startswith("tiny2.safetensors ["), "titles are 'file [hash]'")

    samplers = api.util_get_sampler_names()
    check("Euler a" in samplers and "DPM++ 2M" in samplers, f"get_samplers: {samplers}")
    check("karras" in api.util_get_scheduler_names(), "get_schedulers")

    # Select a model through options, as webuiapi's helper does.
    api.util_set_model(titles[1])
    check(api.util_get_current_model() == titles[1], "set model through options")

    r = api.txt2img(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=1234,
                    width=64, height=64, steps=2, cfg_scale=6.5, batch_size=2)
    check(len(r.images) == 2, "txt2img returns batch_size images")
    check(r.image.size == (64, 64), f"image size {r.image.size}")
    check(isinstance(r.info, dict), "info is a JSON string the client parses")
    check(r.info["seed"] == 1234 and r.info["all_seeds"] == [1234, 1235], f"seeds {r.info['all_seeds']}")
    check(r.info["sd_model_name"] == "tiny2", "the selected model generated it")
    check(r.info["sampler_name"] == "Euler a", "webuiapi's default sampler is used")
    check(len(r.info["infotexts"]) == 2 and "Seed: 1235" in r.info["infotexts"][1], "infotexts")
    check(r.parameters["prompt"] == "a lighthouse at dusk", "parameters echo the request")

    r2 = api.img2img(images=[r.image], prompt="a lighthouse at night", width=64, height=64,
                     denoising_strength=0.6, steps=2, seed=7)
    check(len(r2.images) == 1 and r2.image.size == (64, 64), "img2img returns an image")
    check(r2.info["denoising_strength"] == 0.6 and r2.info["seed"] == 7, "img2img info")

    mask = r.image.convert("L").point(lambda _: 255)
    r3 = api.img2img(images=[r.image], mask_image=mask, prompt="a boat", width=64, height=64,
                     denoising_strength=0.8, steps=2, inpainting_fill=1)
    check(len(r3.images) == 1, "inpainting returns an image")

    # The PIL image keeps our `parameters` text chunk; webuiapi re-sends it as PNG.
    info = api.png_info(r.images[1])
    check(isinstance(info.info, str) and "Seed: 1235" in info.info, f"png_info info: {info.info!r}")
    check(info.parameters.get("Seed") == "1235", f"png_info parameters: {info.parameters}")
    check(info.parameters.get("prompt") == "a lighthouse at dusk", "png_info prompt")

    # Interrupt a long generation from another thread.
    result = {}

    def long_job():
        result["r"] = api.txt2img(prompt="long", width=128, height=128, steps=150, batch_size=10)

    t = threading.Thread(target=long_job)
    t.start()
    for _ in range(2000):
        p = api.get_progress()
        if p["state"]["sampling_step"] > 0:
            break
        time.sleep(0.02)
    else:
        raise SystemExit("FAILED: the long job never started sampling")
    check(0 < p["progress"] < 1 and p["state"]["job_count"] == 1, f"progress while running: {p['progress']}")
    api.interrupt()
    t.join(timeout=600)
    check(not t.is_alive(), "txt2img returns after interrupt")
    check(len(result["r"].images) == 1, "an interrupted job returns the image it was making")
    check(result["r"].info["interrupted"] is True, "info says interrupted")
    check(api.get_progress()["state"]["job_count"] == 0, "idle after interrupt")

    opts = api.get_options()
    check(opts["sd_checkpoint_hash"] == [m["sha256"] for m in models if m["title"] == titles[1]][0],
          "options report the selected checkpoint hash")
    check(api.get_cmd_flags()["api"] is True, "cmd-flags")
    check(api.get_upscalers() == [] and api.get_hypernetworks() == [], "empty feature lists")
    check(isinstance(api.get_memory()["ram"], dict), "memory")
    check(api.get_loras()[0]["name"] == "tinylora", "loras")
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
