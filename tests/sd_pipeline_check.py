"""Run in its own process by `test_diffusion_cfg.py`: diffusers' real `StableDiffusionPipeline` against
`parallel_pipeline(pipe)`, over a tiny UNet2DConditionModel and AutoencoderKL, printing one JSON object.

The pipeline's module imports transformers (for its text encoder, tokenizer and safety checker types) at import
time. Where transformers is not installed, a stand-in package answers those imports (`_stand_in_transformers`),
and diffusers is told transformers is there so that its loaders import: nothing of transformers runs, because
the prompts go in as `prompt_embeds` / `negative_prompt_embeds` and there is no text encoder, tokenizer or safety
checker. What runs is diffusers' own pipeline code: `check_inputs`, `encode_prompt`'s handling of given
embeddings and `num_images_per_prompt`, `prepare_latents`, the denoising loop, `vae.decode`, `postprocess`.
The stand-in changes process-wide import state, which is why this is a separate process.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch


def _stand_in_transformers() -> None:
    import diffusers.utils.import_utils as iu

    iu._transformers_available, iu._transformers_version = True, "4.57.0"

    def attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return name.lower() if name.isupper() else type(name, (), {})  # constants as strings, names as classes

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("transformers", "tokenizers"):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__getattr__, module.__path__, module.__version__ = attr, [], "4.57.0"
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def stable_diffusion_pipeline_class():
    try:
        import transformers  # noqa: F401
    except ImportError:
        _stand_in_transformers()
    module = importlib.import_module("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    return module.StableDiffusionPipeline


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import diffusers
    from helpers import tiny_condition_unet

    from pcr_compile.diffusion import ParallelStableDiffusionPipeline, parallel_pipeline

    pipeline_class = stable_diffusion_pipeline_class()
    torch.manual_seed(0)
    unet = tiny_condition_unet()  # latents (2, 8, 8), cross-attention width 8
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=2, norm_num_groups=4, sample_size=16).eval()

    def pipe_with(scheduler):
        pipe = pipeline_class(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pos, neg = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    schedulers = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
                  "dpm": diffusers.DPMSolverMultistepScheduler, "ddpm": diffusers.DDPMScheduler,
                  "pndm": diffusers.PNDMScheduler}
    cases = {
        "ddim": ("ddim", {}),
        "ddim-eta-rescale-2-per-prompt": ("ddim", dict(eta=0.7, guidance_rescale=0.5, num_images_per_prompt=2)),
        "euler-no-guidance": ("euler", dict(guidance_scale=1.0)),
        "dpm": ("dpm", {}),
        "ddpm-generator-list": ("ddpm", dict(generator=[torch.Generator().manual_seed(1),
                                                        torch.Generator().manual_seed(2)])),
        "ddim-given-latents-pt": ("ddim", dict(latents=torch.randn(2, 2, 8, 8), output_type="pt")),
        "ddim-latent-tuple": ("ddim", dict(output_type="latent", return_dict=False)),
        "pndm": ("pndm", {}),  # not supported by sampling_loop: the pipeline itself runs
    }
    results = {"wrapper": None, "cases": {}}
    for name, (sched, kwargs) in cases.items():
        pipe = pipe_with(schedulers[sched]())
        out = {}
        for label, runner in (("sequential", pipe), ("parallel", parallel_pipeline(pipe))):
            kw = dict(kwargs)
            if "generator" in kw:  # fresh generators with the same seeds for each run
                kw["generator"] = [torch.Generator().manual_seed(g.initial_seed()) for g in kw["generator"]]
            else:
                kw["generator"] = torch.Generator().manual_seed(0)
            kw.setdefault("output_type", "np")
            res = runner(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=8, **kw)
            images = res[0] if isinstance(res, tuple) else res.images
            out[label] = (torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images)
            if label == "parallel":
                results["wrapper"] = type(runner).__name__
                stats = runner.last_stats
                results["cases"][name] = {
                    "tuple": isinstance(res, tuple), "shape": list(out[label].shape),
                    "max_abs_diff": float((out["parallel"].double() - out["sequential"].double()).abs().max()),
                    "scale": float(out["sequential"].double().abs().max()),
                    "rounds": None if stats is None else stats.evaluations,
                    "converged": None if stats is None else bool(stats.converged),
                    "fell_back": None if stats is None else bool(stats.fell_back),
                    "reason": None if stats is None else stats.reason,
                    "depth": None if stats is None else stats.depth}
    pipe = pipe_with(diffusers.DDIMScheduler())
    par = parallel_pipeline(pipe)
    errors = {}
    for label, kw in (("unknown", dict(stepz=3)), ("height", dict(height=12, width=16))):
        try:
            par(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=2, **kw)
            errors[label] = None
        except Exception as e:  # noqa: BLE001 - the type and message are what is checked
            errors[label] = f"{type(e).__name__}: {e}"
    calls = []
    par(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=3, output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: calls.append(i) or {})
    st = par.last_stats
    results["callback_calls"] = calls
    results["callback_stats"] = None if st is None else {"fell_back": st.fell_back, "reason": st.reason,
                                                         "depth": st.depth}
    ticks = []

    class Bar:  # the pipeline's progress bar, recorded
        def __init__(self, total=None, **kwargs):
            ticks.append(("total", total))

        def update(self, n=1):
            ticks.append(n)

        def set_description(self, *args, **kwargs):
            pass

        set_postfix = set_description

        def close(self):
            ticks.append("closed")

    pipe.progress_bar = Bar
    par(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=6, output_type="latent")
    results["bar"], results["bar_rounds"] = ticks, par.last_stats.evaluations
    results["errors"] = errors
    fresh = pipe_with(diffusers.DDIMScheduler())  # never run sequentially: what the parallel call alone sets
    parallel_pipeline(fresh)(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=3, guidance_scale=3.0,
                             guidance_rescale=0.25, output_type="latent")
    results["properties"] = {name: getattr(fresh, name, None) for name in (
        "num_timesteps", "guidance_scale", "guidance_rescale", "do_classifier_free_guidance", "interrupt")}
    results["isinstance"] = isinstance(par, ParallelStableDiffusionPipeline)
    swapped = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    par.scheduler = swapped  # reaches the pipeline, as on the pipeline itself
    results["scheduler_swapped"] = pipe.scheduler is swapped and par.scheduler is swapped
    print(json.dumps(results))


if __name__ == "__main__":
    main()
