"""VSD's particle model: the teacher's U-Net with LoRA adapters (peft) and a camera embedding.

Variational score distillation (:class:`carv3d.estimator.VariationalScoreDistillation`) replaces
SDS's injected noise ε by ε̂_φ, a noise predictor of the *current renders'* distribution:

    ε̂_φ(x_t, t, y, c) = U-Net_{W + (α/r)·B·A}(x_t, t, y; emb(t) + MLP_φ(c))

- **LoRA** (peft's ``LoraConfig``, no hand-written adapters) on every attention projection
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of a frozen copy of the teacher's U-Net: rank r,
  scale α/r, A ~ N(0, 1/r²), B = 0 — the initialisation of diffusers' ``LoRAAttnProcessor`` that
  ProlificDreamer and threestudio use. peft keeps the adapters in float32 when the U-Net is fp16.
- **Camera**: the render's camera-to-world matrix, flattened to 16 numbers, through diffusers'
  ``TimestepEmbedding`` (Linear–SiLU–Linear) into the U-Net's class embedding, which the U-Net adds
  to its time embedding (threestudio's ``camera_embedding``). Its output layer starts at zero, so
  at initialisation ε̂_φ equals the teacher's conditional prediction exactly (threestudio keeps
  diffusers' random init, which starts ε̂_φ away from the teacher). The null camera (dropout,
  ``camera_condition: false``) is c2w = 0.
- **Text**: ε̂_φ sees the plain prompt (no view suffix), as threestudio's VSD does; the camera
  carries the view.
- **One U-Net call** (``fused_call``): peft's mixed-batch inference runs rows with different
  adapters in one forward (``adapter_names``; ``"__base__"`` = no adapter). The rows
  [x_t | uncond, x_t | cond, x_t | plain + camera] go through the copy with adapters
  [base, base, LoRA]; the base rows see the frozen weights and the frozen camera layer (zero
  output), so they are the teacher's predictions. Guided ε̂_s and ε̂_φ for N draws: one call of
  3N rows (2N + N when the guidance scale is 1, N + N). With ``fused_call: false`` (the default)
  the teacher's own call gives ε̂_s and the copy's gives ε̂_φ: two calls, but on CUDA both are
  replays of CUDA graphs (``teacher.cuda_graph``), which cost less than one eager mixed-batch call
  — peft's mixed batches index every adapted layer's rows with Python lists (a host-to-device copy
  each) and run the camera layers row by row. On a CPU the fused call runs fewer ops.
- **Training** (:meth:`LoRAParticle.update`), forward and backward replayed from CUDA graphs
  (``torch.cuda.make_graphed_callables``) when the teacher's call is: the standard diffusion loss
  ``mean ‖out(√ᾱ_t x + √(1−ᾱ_t) ε, t) − target‖²`` with target ε, v = √ᾱ_t ε − √(1−ᾱ_t) x or x for
  ε-, v- and x₀-predicting teachers, one AdamW step of its own (learning rate ``lora_lr``). A step
  whose loss is not finite is skipped: on CUDA on the device (fused AdamW's ``found_inf``, no host
  sync), elsewhere by reading the loss.

Cost: a second copy of the U-Net's weights (SD 2.1: 866 M parameters, 1.7 GB in fp16) so that the
teacher stays untouched and shareable; the adapters add ~0.1 % (rank 4).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F

from carv3d.errors import BackendUnavailableError, ConfigError
from carv3d.log import logger
from carv3d.teacher.base import Conditioning
from carv3d.teacher.diffusers_teacher import DiffusersTeacher, model_output_to_noise

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections LoRAAttnProcessor adapts
CAMERA_FEATURES = 16  # a flattened 4×4 camera-to-world matrix
CAMERA_LAYERS = ("class_embedding.linear_1", "class_embedding.linear_2")  # trained copies (peft modules_to_save)
ADAPTER = "default"  # peft's adapter name
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class _TrainingForward(torch.nn.Module):
    """The copy's forward as a module of tensor arguments only, for ``torch.cuda.make_graphed_callables``
    (which records forward and backward of a module; its trainable parameters are the LoRA's)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, hidden, class_labels=labels).sample


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise BackendUnavailableError("guidance.type vsd needs peft (LoRA adapters): pip install 'carv3d[vsd]' "
                                      "(or pip install peft).") from None
    return peft


class LoRAParticle:
    """ε̂_φ for VSD (see the module docstring): a LoRA copy of ``teacher``'s U-Net and its optimiser.

    Args:
        teacher: a diffusers teacher (Stable Diffusion or the embedded pixel-space one).
        rank, scale: LoRA rank r and output scale α/r.
        lr, betas, eps, weight_decay: AdamW of the adapters and the camera embedding.
        camera_condition: feed the camera pose; False trains and predicts with the null camera.
        fused_call: pretrained and LoRA predictions in one eager mixed-batch U-Net call (else two
            calls, CUDA-graph replays when the teacher's fast path has them).
        seed: the adapters' and camera layer's initialisation (a fork of the global RNG).

    Attributes:
        num_train_timesteps: the teacher's T.
        model: the peft-wrapped U-Net copy.
    """

    def __init__(self, teacher: DiffusersTeacher, rank: int = 4, scale: float = 1.0, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-15, weight_decay: float = 0.01,
                 camera_condition: bool = True, fused_call: bool = False, seed: int = 0):
        peft = _peft()
        from diffusers.models.embeddings import TimestepEmbedding

        self.teacher = teacher
        self.device, self.dtype = teacher.device, teacher.dtype
        self.num_train_timesteps = int(teacher.num_train_timesteps)
        self.prediction_type = teacher.prediction_type
        self.camera_condition, self.fused_call = bool(camera_condition), bool(fused_call)
        # The copy runs eagerly: NCHW weights, whatever layout a compiled teacher gave its own U-Net
        # (channels-last eager convolutions measured slower; docs/BENCHMARKS.md).
        unet = copy.deepcopy(teacher.unet).to(memory_format=torch.contiguous_format)
        if getattr(unet, "class_embedding", None) is not None:
            raise ConfigError(f"guidance.type vsd conditions the LoRA copy on the camera through the U-Net's class "
                              f"embedding, but teacher {teacher.name} already has one; use guidance.type sds or csd.")
        time_width = int(unet.time_embedding.linear_2.out_features)
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            camera = TimestepEmbedding(CAMERA_FEATURES, time_width)
            torch.nn.init.zeros_(camera.linear_2.weight)  # ε̂_φ = ε̂_pretrained at init
            torch.nn.init.zeros_(camera.linear_2.bias)
            unet.class_embedding = camera.to(self.device)
            config = peft.LoraConfig(r=int(rank), lora_alpha=float(scale) * int(rank), init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGETS), modules_to_save=list(CAMERA_LAYERS))
            self.model = peft.get_peft_model(unet, config)
        self.model.to(self.device).eval()  # eval: peft's mixed batches are inference-mode; the U-Net has no dropout
        # ε̂_φ alone goes through a CUDA graph when the teacher's call does (teacher.cuda_graph): a replay
        # instead of hundreds of launches plus peft's Python per adapted layer. The camera labels are a
        # graph input through a static buffer per batch size (the graph reads its memory at replay).
        self._labels: dict[int, torch.Tensor] = {}
        self._particle_call: Any = self._particle_forward
        if teacher.fast.cuda_graph:
            from carv3d.teacher.graphs import CapturedUNet

            self._particle_call = CapturedUNet(self._particle_forward)
        # The training forward and backward as CUDA graphs too (one per batch shape; eager on failure).
        self._graph_training = bool(teacher.fast.cuda_graph) and self.device.type == "cuda"
        self._training_calls: dict[tuple, Any] = {}
        self.trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.sync_free = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=float(lr), betas=tuple(betas),
                                           eps=float(eps), weight_decay=float(weight_decay),
                                           **({"fused": True} if self.sync_free else {}))
        logger.info("vsd: LoRA rank %d (scale %g) on %d attention projections, camera embedding %s, %d trainable "
                    "parameters; %s", rank, scale, sum(".lora_A." in n for n in self.trainable),
                    "on" if self.camera_condition else "off", sum(p.numel() for p in self.trainable.values()),
                    "one mixed-batch U-Net call" if self.fused_call else
                    "teacher and LoRA calls" + (" (CUDA graphs)" if teacher.fast.cuda_graph else ""))

    # ------------------------------------------------------------------ inputs
    def _camera_labels(self, cond: Conditioning, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(M, 16) float32 class labels: the flattened c2w of each row, 0 for the null camera."""
        m = len(cond)
        if not self.camera_condition or cond.cameras is None:
            return torch.zeros(m, CAMERA_FEATURES, device=self.device)
        labels = cond.cameras.reshape(m, CAMERA_FEATURES).to(self.device, torch.float32)
        if kept is not None:
            labels = labels * kept.to(self.device).reshape(m, 1)
        return labels

    def _check(self, x_t: torch.Tensor, t: torch.Tensor, *conds: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        m = x_t.shape[0]
        channels = self.teacher.latent_shape[0]
        if x_t.dim() != 4 or x_t.shape[1] != channels:
            raise ValueError(f"x_t must be (M, {channels}, h, w), got {tuple(x_t.shape)}")
        t = t.to(self.device, torch.long).reshape(-1)
        if t.shape != (m,) or any(len(c) != m for c in conds):
            raise ValueError(f"t must be ({m},) and each conditioning must have {m} rows")
        return x_t.detach().to(self.device, self.teacher._output_dtype), t

    def _unet(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor,
              adapter_names: Optional[list[str]] = None) -> torch.Tensor:
        """One call of the copy → the first C output channels in the output dtype (the model's own
        parameterisation: ε, v or x₀)."""
        kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
        out = self.model(x.to(self.dtype), t, hidden.to(self.device, self.dtype), class_labels=labels,
                         **kwargs).sample
        return out[:, : x.shape[1]].to(self.teacher._output_dtype)

    # ------------------------------------------------------------------ predictions
    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, particle_cond: Conditioning,
                guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ε̂_s, ε̂_φ)`` for M rows, each (M, C, h, w) in the output dtype, no gradient.

        ε̂_s = ε_u + s·(ε_c − ε_u) of the frozen teacher on ``cond`` (view-dependent text, negative
        prompt); ε̂_φ of the LoRA copy on ``particle_cond`` (plain text and camera poses). At most
        ``teacher.max_batch`` draws per U-Net call (3× that many rows when fused).
        """
        x_t, t = self._check(x_t, t, cond, particle_cond)
        scale = float(guidance_scale)
        if not self.fused_call:
            guided = self.teacher.predict_noise(x_t, t, cond, scale)
            return guided, self._particle(x_t, t, particle_cond)
        guided, particle = torch.empty_like(x_t), torch.empty_like(x_t)
        step = self.teacher.max_batch
        for start in range(0, x_t.shape[0], step):
            rows = slice(start, start + step)
            x, tt = x_t[rows], t[rows]
            m = x.shape[0]
            texts = [cond.cond[rows]] if scale == 1.0 else [cond.uncond[rows], cond.cond[rows]]
            n_base = len(texts)
            labels = torch.cat([torch.zeros(n_base * m, CAMERA_FEATURES, device=self.device),
                                self._camera_labels(particle_cond)[rows]])
            out = self._unet(x.repeat(n_base + 1, 1, 1, 1), tt.repeat(n_base + 1),
                             torch.cat([*texts, particle_cond.cond[rows]]), labels,
                             adapter_names=[BASE] * (n_base * m) + [ADAPTER] * m)
            alpha_bar = self.teacher.alphas_cumprod[tt].to(x.dtype)
            branches = [model_output_to_noise(o, x, alpha_bar, self.prediction_type) for o in out.split(m)]
            guided[rows] = branches[0] if n_base == 1 else branches[0] + scale * (branches[1] - branches[0])
            particle[rows] = branches[-1]
        return guided, particle

    def _particle_forward(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The copy with its adapters on one batch, camera labels from the static buffer of its size."""
        return self.model(sample, timestep, hidden, class_labels=self._labels[sample.shape[0]]).sample

    def _particle(self, x_t: torch.Tensor, t: torch.Tensor, particle_cond: Conditioning) -> torch.Tensor:
        """ε̂_φ alone (every row through the adapters), chunked like the teacher's calls."""
        out = torch.empty_like(x_t)
        labels = self._camera_labels(particle_cond)
        channels = x_t.shape[1]
        for start in range(0, x_t.shape[0], self.teacher.max_batch):
            rows = slice(start, start + self.teacher.max_batch)
            x, tt = x_t[rows], t[rows]
            buffer = self._labels.get(x.shape[0])
            if buffer is None:
                buffer = self._labels[x.shape[0]] = torch.zeros(x.shape[0], CAMERA_FEATURES, device=self.device)
            buffer.copy_(labels[rows])
            raw = self._particle_call(x.to(self.dtype), tt, particle_cond.cond[rows].to(self.device, self.dtype))
            raw = raw[:, :channels].to(self.teacher._output_dtype)
            alpha_bar = self.teacher.alphas_cumprod[tt].to(x_t.dtype)
            out[rows] = model_output_to_noise(raw, x, alpha_bar, self.prediction_type)
        return out

    @torch.no_grad()
    def predict_particle(self, x_t: torch.Tensor, t: torch.Tensor, particle_cond: Conditioning) -> torch.Tensor:
        """ε̂_φ(x_t, t, y, c): (M, C, h, w), no gradient."""
        x_t, t = self._check(x_t, t, particle_cond)
        return self._particle(x_t, t, particle_cond)

    # ------------------------------------------------------------------ training
    def loss(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, particle_cond: Conditioning,
             camera_kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The diffusion loss of the copy at clean rows x (no graph to x), with a graph to φ: () float32.

        x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε (diffusers' ``add_noise`` arithmetic); target ε, v or x by the
        teacher's prediction type; mean squared error over every element.
        """
        x, t = self._check(x, t, particle_cond)
        noise = noise.detach().to(self.device, x.dtype)
        a = self.teacher.alphas_cumprod.to(x.dtype)[t].reshape(-1, 1, 1, 1)
        x_t = a ** 0.5 * x + (1 - a) ** 0.5 * noise
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = a ** 0.5 * noise - (1 - a) ** 0.5 * x
        else:  # "sample"
            target = x
        labels = self._camera_labels(particle_cond, camera_kept)
        with torch.enable_grad():
            if self._graph_training:
                inputs = (x_t.to(self.dtype), t, particle_cond.cond.to(self.device, self.dtype), labels)
                out = self._training_call(inputs)(*inputs)[:, : x.shape[1]].to(self.teacher._output_dtype)
            else:
                out = self._unet(x_t, t, particle_cond.cond, labels)
            return F.mse_loss(out.float(), target.float())

    def _training_call(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The graphed training forward for these input shapes, recorded on first use (3 warm-up
        iterations, as ``make_graphed_callables`` does); the eager module when recording fails."""
        key = tuple((tuple(i.shape), i.dtype) for i in inputs)
        call = self._training_calls.get(key)
        if call is None:
            module = _TrainingForward(self.model)
            try:
                call = torch.cuda.make_graphed_callables(module, tuple(i.clone() for i in inputs))
                logger.info("vsd: captured CUDA graphs of the LoRA's training forward and backward for %s",
                            tuple(inputs[0].shape))
            except Exception as err:  # noqa: BLE001 — any capture failure falls back to eager, logged
                logger.warning("vsd: CUDA graph capture of the LoRA's training step failed for %s (%s: %s); "
                               "running it eagerly", tuple(inputs[0].shape), type(err).__name__,
                               str(err).splitlines()[0][:200] if str(err) else "")
                torch.cuda.synchronize(self.device)
                call = module
            self._training_calls[key] = call
        return call

    def update(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, particle_cond: Conditioning,
               camera_kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One AdamW step on :meth:`loss` (skipped when the loss is not finite); returns the loss, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, t, noise, particle_cond, camera_kept)
        loss.backward()
        finite = torch.isfinite(loss)
        if self.sync_free:  # fused AdamW skips on the device when found_inf is 1: no host sync
            self.optimizer.found_inf = (~finite).to(torch.float32)  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        elif bool(finite):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters: LoRA A and B of every adapted projection, and the camera layers."""
        return list(self.trainable.values())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The trainable weights (CPU copies, by name) and the optimiser's state."""
        return {"weights": {name: p.detach().cpu().clone() for name, p in self.trainable.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ValueError when the weights are not this model's (another rank)."""
        weights = state["weights"]
        if set(weights) != set(self.trainable):
            raise ValueError(f"VSD particle state has {len(weights)} tensors, this model {len(self.trainable)} "
                             "(another guidance.lora_rank or teacher?)")
        for name, p in self.trainable.items():
            if weights[name].shape != p.shape:
                raise ValueError(f"VSD particle tensor {name} has shape {tuple(weights[name].shape)}, this model "
                                 f"{tuple(p.shape)} (another guidance.lora_rank?)")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the step mode follows this device, not the saved one
            group["fused"] = True if self.sync_free else None
            group["foreach"] = None
            for p in group["params"]:
                saved = self.optimizer.state.get(p)
                if saved and torch.is_tensor(saved.get("step")):
                    where = p.device if self.sync_free else torch.device("cpu")
                    saved["step"] = saved["step"].to(device=where, dtype=torch.float32)


def build_particle(guidance_cfg: Any, teacher: Any, seed: int = 0) -> Optional[LoRAParticle]:
    """The particle model a ``guidance`` section asks for (``type: vsd``), or None for the others."""
    if guidance_cfg is None or str(getattr(guidance_cfg, "type", "")) != "vsd":
        return None
    if not isinstance(teacher, DiffusersTeacher):
        raise ConfigError(f"guidance.type vsd needs a diffusers teacher (its U-Net gets the LoRA adapters), "
                          f"not {type(teacher).__name__}.")
    g = guidance_cfg
    return LoRAParticle(teacher, rank=int(g.lora_rank), scale=float(g.lora_scale), lr=float(g.lora_lr),
                        betas=(float(g.lora_betas[0]), float(g.lora_betas[1])), eps=float(g.lora_eps),
                        weight_decay=float(g.lora_weight_decay), camera_condition=bool(g.camera_condition),
                        fused_call=bool(g.fused_call), seed=seed)
