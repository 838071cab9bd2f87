"""Fine-tuning methods: which parameters train, and how the base model is loaded for them.

- lora / dora / rslora: peft LoRA adapters (DoRA adds a learned magnitude per output; rsLoRA
  scales by alpha/sqrt(r) instead of alpha/r, which keeps high ranks stable). The base stays frozen.
- qlora: LoRA on a base quantized to 4-bit NF4 by bitsandbytes; CUDA only, checked before any
  model is loaded.
- full: every parameter trains.
- freeze: only the last ``trainable_layers`` transformer blocks train, plus the final norm when
  ``train_norm`` and the output head when ``train_lm_head`` (in models with tied embeddings, such
  as SmolLM2, the input embeddings then train too, since they are the same tensor).
"""

from __future__ import annotations

import importlib.util

import torch

from tunesmith.config import MethodConfig
from tunesmith.errors import UsageError
from tunesmith.models.safety import refusing_remote_code, require_safetensors
from tunesmith.run import is_adapter


def check_available(method: MethodConfig) -> None:
    """Fail before any model is loaded when the method cannot run on this machine."""
    if method.name != "qlora":
        return
    if not torch.cuda.is_available():
        raise UsageError("method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); none is available here. "
                         "Use --method lora (same adapters on an unquantized base) on this machine.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("method qlora needs bitsandbytes: pip install 'tunesmith[cuda]'")


def load_base_model(path, method: MethodConfig, attn_implementation: str | None = None, allow_pickle: bool = False):
    """The base model in fp32 (master weights; autocast does the low-precision math), or NF4 for qlora.

    Without an ``attn_implementation``, a model that gets transformers' sdpa gets attention.PACKED_SDPA
    instead: the same kernel, run per example on packed rows instead of through a dense mask.
    Safetensors only unless ``allow_pickle`` (model.allow_pickle); never the model's own Python code."""
    from transformers import AutoModelForCausalLM

    require_safetensors(path, allow_pickle)
    kwargs = {"dtype": torch.float32, "trust_remote_code": False, "use_safetensors": None if allow_pickle else True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if method.name == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs.update(dtype=compute, device_map={"": torch.cuda.current_device()},
                      quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_use_double_quant=True,
                                                             bnb_4bit_compute_dtype=compute))
    with refusing_remote_code(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not attn_implementation:
        from tunesmith.attention import use_packed_sdpa  # deferred: attention imports transformers

        use_packed_sdpa(model)
    return model


def hold_frozen_weights(model, dtype: torch.dtype) -> int:
    """Store the frozen ``nn.Linear`` weights in ``dtype``, the autocast dtype; returns how many.

    Autocast casts every fp32 weight to bf16 at every forward and keeps nothing; a weight that never
    changes is better cast once. The results are the same bit for bit (the same rounding, done once),
    and the fp32 copies (two thirds of the default model) no longer take memory. Only for the adapter
    methods, whose saved outputs hold no base weight; weights shared with the input embeddings stay
    fp32, so the residual stream does too.
    """
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module) is torch.nn.Linear and not weight.requires_grad and id(weight) not in shared
                and weight.dtype == torch.float32):
            module.to(dtype)
            count += 1
    return count


def apply_method(model, method: MethodConfig, gradient_checkpointing: bool = False):
    """Return the model with exactly the parameters of ``method`` trainable."""
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if is_adapter(method.name):
        return _with_lora(model, method, gradient_checkpointing)
    if method.name == "full":
        model.requires_grad_(True)
        return model
    if method.name == "freeze":
        return _freeze_all_but_last(model, method)
    raise UsageError(f"method.name: unknown method {method.name!r}")


def _with_lora(model, method: MethodConfig, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.name == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    targets = method.target_modules
    lora = LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, bias="none",
                      task_type="CAUSAL_LM", use_dora=method.name == "dora", use_rslora=method.name == "rslora",
                      target_modules="all-linear" if targets == ["all-linear"] else targets)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:  # peft names the modules it could not find; add what would work
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UsageError(f"method.target_modules: {exc}. Linear modules in this model: {', '.join(linear)}") from None
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    return peft_model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise UsageError("method freeze: could not find the model's list of transformer layers")
    return max(lists, key=len)


def _freeze_all_but_last(model, method: MethodConfig):
    layers = decoder_layers(model)
    if not 1 <= method.trainable_layers <= len(layers):
        raise UsageError(f"method.trainable_layers must be between 1 and {len(layers)} for this model "
                         f"(got {method.trainable_layers})")
    model.requires_grad_(False)
    for layer in layers[len(layers) - method.trainable_layers:]:
        layer.requires_grad_(True)
    if method.train_norm:
        norm = getattr(getattr(model, "model", model), "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
    if method.train_lm_head:
        model.get_output_embeddings().requires_grad_(True)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied tensors are counted once."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return total, trainable


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors that change in training, by their names in ``model.state_dict()``."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}
