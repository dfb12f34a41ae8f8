"""diffusers pipelines, sampled by the parallel solve: `parallel_pipeline(DDIMPipeline | DDPMPipeline)`.

`parallel_pipeline(pipe)(batch_size=..., num_inference_steps=..., generator=...)` takes the arguments of the
wrapped pipeline's `__call__` and returns what it returns (an `ImagePipelineOutput`, or a tuple with
`return_dict=False`), from the same initial latents and the same per-step noise (drawn from `generator` in
diffusers' order), so the images equal the sequential pipeline's within the solve's tolerance. The sampler
runs through `sampling_loop` + `parallel_sample`; the progress bar (the pipeline's own `progress_bar`, so
`pipe.set_progress_bar_config` applies) advances once per round, its total the number of steps (the most
rounds a solve takes). The stats of the last call are in `.last_stats`.
"""

from __future__ import annotations

from typing import Any

import torch

from pcr_compile.diffusion.loop import sampling_loop
from pcr_compile.diffusion.parallel import parallel_sample

PIPELINES = ("DDIMPipeline", "DDPMPipeline")


class ParallelPipeline:
    """A DDIM / DDPM pipeline whose sampler loop is one parallel solve; see the module docstring."""

    def __init__(self, pipe: Any, **solver_options: Any):
        name = type(pipe).__name__
        if name not in PIPELINES or not type(pipe).__module__.startswith("diffusers."):
            raise NotImplementedError(f"parallel_pipeline supports {', '.join(PIPELINES)}, got {name}")
        self.pipe, self.options, self.last_stats = pipe, dict(solver_options), None

    def __getattr__(self, item: str) -> Any:  # unet, scheduler, progress_bar, ... of the wrapped pipeline
        return getattr(self.__dict__["pipe"], item)

    def _image_shape(self, batch_size: int) -> tuple[int, ...]:
        cfg = self.pipe.unet.config
        size = (cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        return (batch_size, cfg.in_channels, *size)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Any = None, eta: float = 0.0,
                 num_inference_steps: int | None = None, use_clipped_model_output: bool | None = None,
                 output_type: str | None = "pil", return_dict: bool = True):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        ddim = type(pipe).__name__ == "DDIMPipeline"
        if num_inference_steps is None:
            num_inference_steps = 50 if ddim else 1000  # the pipelines' defaults
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got a list of {len(generator)} generators for batch_size={batch_size}")
        kwargs = {}
        if ddim:
            kwargs["eta"] = eta
            if use_clipped_model_output is not None:
                kwargs["use_clipped_model_output"] = use_clipped_model_output
        device = pipe._execution_device
        # the pipelines' own initial draw: DDIM on the execution device, DDPM too (off mps)
        image = randn_tensor(self._image_shape(batch_size), generator=generator, device=device,
                             dtype=pipe.unet.dtype)
        loop = sampling_loop(pipe.unet, pipe.scheduler, num_inference_steps, **kwargs)
        bar = pipe.progress_bar(total=num_inference_steps)
        bar.set_description("rounds")

        def on_round(committed: int, steps: int) -> None:
            bar.update(1)
            bar.set_postfix(steps=f"{committed}/{steps}")

        try:
            image, self.last_stats = parallel_sample(loop, image * loop.init_noise_sigma, generator=generator,
                                                     on_round=on_round, **self.options)
        finally:
            bar.close()
        pipe.scheduler.set_timesteps(num_inference_steps)  # left as the sequential pipeline leaves it
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def parallel_pipeline(pipe: Any, **solver_options: Any) -> ParallelPipeline:
    """Wrap a diffusers `DDIMPipeline` / `DDPMPipeline`; `solver_options` go to `parallel_sample` (tol, rule,
    accel, jacobian, history, window, max_iters)."""
    return ParallelPipeline(pipe, **solver_options)
