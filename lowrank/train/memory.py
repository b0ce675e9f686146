"""Predict the memory of a fine-tuning step from the model config alone: nothing is allocated.

One model in one file (about 440 lines): the architecture description, the parameter and per-layer byte
counts and the estimate share every term, and each term is checked by hand in tests/unit/train/test_memory.py.

    est = estimate_memory(config, "lora", batch_size=8, seq_len=1024, rank=16, targets="all-linear",
                          weight_dtype="bf16", precision="bf16")
    est.total_bytes / 2**30, est.as_dict()

Terms (bytes):
- weights: frozen parameters in `weight_dtype`, trained ones in `trainable_dtype` (the trainer: `model.dtype`
  for the frozen base, fp32 for LoRA factors and head).
- grads: one per trainable parameter, in the weight dtype (autograd accumulates into `.grad` of that dtype).
- optimizer: AdamW's two moments per trainable parameter, in the parameter's dtype (torch's AdamW allocates
  them with `zeros_like(param)`, fused or not): fp32 weights give 4 + 4 + 8 = 16 bytes per trained parameter.
- weight copies: under bf16 autocast with fp32 weights, every linear weight is cast to bf16 once per forward
  and the copy lives until the backward has used it (autocast caches the copy of a trainable weight; the matmul
  saves the copy of a frozen one for the input gradient): 2 bytes per linear weight.
- activations: tensors saved for the backward, counted tensor by tensor for the HF implementations of Llama,
  BERT/RoBERTa and GPT-2 with SDPA attention (see `_layer_bytes_per_token`). The bookkeeping follows Korthikanti
  et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198, §4.1): a
  GPT layer in fp16 saves s·b·h·(34 + 5·a·s/h) bytes. Fused attention (flash / memory-efficient SDPA) drops
  the 5·a·s/h term (it saves the output and a log-sum-exp instead of the s×s probabilities); Llama's SwiGLU
  MLP saves three (b, s, i) tensors plus the down projection's input instead of GELU's two; norms run in fp32;
  LoRA skips the inputs of frozen linears (no weight gradient) but saves its own input and the rank-r
  intermediate. With activation checkpointing only each layer's input is kept (s·b·h per layer in the
  residual dtype) and one layer is recomputed at a time. On top of the saved tensors comes the largest of
  three transients: one layer's backward temporaries, the LM loss's fp32 (b, s, vocab) gradients, and the
  k/v cache that transformers fills during a training forward while `config.use_cache` is on.

Sharded (FSDP2, `shards` = N ranks, `fully_shard` per transformer block): each rank holds 1/N of the weights,
gradients and AdamW moments (rounded up), plus what FSDP gathers (`gather_bytes`): two blocks' weights whole (the
block computing and the next one prefetched; in bf16 when bf16 compute all-gathers bf16 copies of fp32 weights,
which then need no autocast copies) and two blocks' trainable gradients whole (a block's unsharded gradient
and the reduce-scatter buffer it is copied into). Activations are a rank's own micro-batch, unsharded. Data
parallel (DDP) holds everything whole; each rank's micro-batch is its share of the batch.

Peak (`total_bytes`): the backward frees saved activations and weight copies layer by layer while it writes
gradients, and the trainer drops gradients (`zero_grad(set_to_none=True)`) before the next forward, so

    total = weights + optimizer + max(weight_copies + activations, grads + last layer)   grad_accum == 1
    total = weights + optimizer + grads + weight_copies + activations                   grad_accum > 1

("last layer": the first layer's saved tensors, temporaries and weight copies, still alive when nearly every
gradient exists; with accumulation, earlier micro-batches' gradients are alive during the next forward).
The estimate assumes every sequence is `seq_len` tokens long; padded batches (the default, as the trainer
pads) carry a mask, which makes SDPA repeat grouped k/v heads instead of using native GQA.

Checked against `torch.cuda.max_memory_allocated` on an H200 (torch 2.11, transformers 5.17, random-init
Llama shapes, SDPA, fused AdamW, steps 2-3): 22 settings of TinyLlama-1.1B and Llama-2-7B shapes (full / LoRA
r=8 q,v / r=16 all-linear; fp32 or bf16 weights; classification or LM head; checkpointing; accumulation)
gave estimate / measured between 0.985 and 1.039. (Measured before LoRA layers sharing an input computed as
one group; a group saves one cast copy of that input instead of one per layer, which the model now counts:
the test suite checks that count against saved tensors on the CPU.) Allocated memory is not what the
allocator reserves: fragmentation can make a run that is estimated to fit fail under a hard cap, hence the
probe in budget.py.
"""
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from lowrank.errors import ConfigError, check_choice
from lowrank.config import METHODS, check_positive, check_rank_fits, resolve_precision, resolve_weight_dtype
from lowrank.adapters.targets import ALL_LINEAR, select_targets
from lowrank.train.blocks import compile_on
from lowrank.train.lm_loss import CHUNK_TOKENS, chunked_loss_on, head_extra

GIB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
HEADS = ("classification", "causal_lm")
LLAMA_LIKE = ("llama", "mistral")
BERT_LIKE = ("bert", "roberta")
# Tensors of the MLP width an activation function saves for its backward (HF implementations): built-ins save
# their input; GPT-2's `gelu_new` is written out in Python and saves four (input, 0.5·x, tanh, 1 + tanh).
ACTIVATION_SAVES = {"silu": 1, "swish": 1, "gelu": 1, "relu": 1, "gelu_pytorch_tanh": 1, "gelu_new": 4,
                    "gelu_fast": 4}


@dataclass(frozen=True)
class Linear:
    name: str  # module path inside one layer, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Arch:
    """What the arithmetic reads from an HF config."""
    family: str  # "llama" | "bert" | "gpt2"
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    positions: int
    type_vocab: int
    tie_embeddings: bool
    activation: str
    hidden_dropout: float
    linears: tuple[Linear, ...]  # one layer's linear modules, in model order
    kv_cache: bool = False  # config.use_cache: transformers builds a k/v cache even in a training forward


def _shape_config(shape: Mapping):
    from lowrank.data.shapes import hf_config_from_shape  # transformers only when given a bare shape
    return hf_config_from_shape(shape, num_labels=2)


def arch_from_config(config) -> Arch:
    """`config` is an HF PretrainedConfig or a shape mapping with `model_type` (see lowrank.data.shapes)."""
    if isinstance(config, Mapping):  # a plain dict or an OmegaConf DictConfig
        config = _shape_config(config)
    mt = config.model_type
    h, L = config.hidden_size, config.num_hidden_layers
    if mt in LLAMA_LIKE:
        a = config.num_attention_heads
        g = getattr(config, "num_key_value_heads", None) or a
        d = getattr(config, "head_dim", None) or h // a
        i = config.intermediate_size
        ab, mb = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
        linears = (Linear("self_attn.q_proj", h, a * d, ab), Linear("self_attn.k_proj", h, g * d, ab),
                   Linear("self_attn.v_proj", h, g * d, ab), Linear("self_attn.o_proj", a * d, h, ab),
                   Linear("mlp.gate_proj", h, i, mb), Linear("mlp.up_proj", h, i, mb),
                   Linear("mlp.down_proj", i, h, mb))
        return Arch("llama", mt, h, i, L, a, g, d, config.vocab_size, config.max_position_embeddings, 0,
                    bool(config.tie_word_embeddings), config.hidden_act, 0.0, linears,
                    bool(getattr(config, "use_cache", False)))
    if mt in BERT_LIKE:
        a, i = config.num_attention_heads, config.intermediate_size
        linears = (Linear("attention.self.query", h, h, True), Linear("attention.self.key", h, h, True),
                   Linear("attention.self.value", h, h, True), Linear("attention.output.dense", h, h, True),
                   Linear("intermediate.dense", h, i, True), Linear("output.dense", i, h, True))
        return Arch("bert", mt, h, i, L, a, a, h // a, config.vocab_size, config.max_position_embeddings,
                    config.type_vocab_size, bool(config.tie_word_embeddings), config.hidden_act,
                    float(config.hidden_dropout_prob), linears)
    if mt == "gpt2":
        a, i = config.n_head, config.n_inner or 4 * h
        linears = (Linear("attn.c_attn", h, 3 * h, True), Linear("attn.c_proj", h, h, True),
                   Linear("mlp.c_fc", h, i, True), Linear("mlp.c_proj", i, h, True))
        return Arch("gpt2", mt, h, i, L, a, a, h // a, config.vocab_size, config.n_positions, 0,
                    bool(config.tie_word_embeddings), config.activation_function, float(config.resid_pdrop),
                    linears, bool(getattr(config, "use_cache", False)))
    raise ConfigError(f"model_type={mt!r}: the memory model knows {list(LLAMA_LIKE + BERT_LIKE) + ['gpt2']}")


# ---------------------------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ParamCounts:
    embeddings: int
    attention: int  # all layers: q, k, v, o (with biases)
    mlp: int        # all layers
    norms: int      # all layer norms, including embedding and final ones
    pooler: int     # BERT's pooler (dense h×h before the classifier)
    head: int       # classification head (or LM head, 0 when tied to the embeddings)
    total: int
    linear_weights: int  # weights of every nn.Linear (blocks, pooler, head): what autocast copies to bf16


def _head_linears(arch: Arch, num_labels: int, head: str) -> list[Linear]:
    h = arch.hidden
    if head == "causal_lm":
        if arch.family == "bert":
            raise ConfigError(f"model_type={arch.model_type!r} has no causal LM head here")
        return [] if arch.tie_embeddings else [Linear("lm_head", h, arch.vocab, False)]
    if arch.model_type == "roberta":  # RobertaClassificationHead: dense + out_proj on the first token
        return [Linear("classifier.dense", h, h, True), Linear("classifier.out_proj", h, num_labels, True)]
    if arch.family == "bert":
        return [Linear("classifier", h, num_labels, True)]
    return [Linear("score", h, num_labels, False)]  # Llama, GPT-2


def count_params(config, num_labels: int = 2, head: str = "classification") -> ParamCounts:
    """Parameter counts of AutoModelForSequenceClassification (or ...ForCausalLM with head="causal_lm")."""
    check_choice("head", head, HEADS)
    arch = config if isinstance(config, Arch) else arch_from_config(config)
    h, L = arch.hidden, arch.layers
    attn = L * sum(lin.params for lin in arch.linears[:4 if arch.family != "gpt2" else 2])
    mlp = L * sum(lin.params for lin in arch.linears[4 if arch.family != "gpt2" else 2:])
    if arch.family == "llama":
        embeddings, norms = arch.vocab * h, L * 2 * h + h  # RMSNorm: weight only
    elif arch.family == "bert":
        embeddings = (arch.vocab + arch.positions + arch.type_vocab) * h
        norms = 2 * h + L * 2 * 2 * h  # LayerNorm: weight and bias
    else:
        embeddings, norms = (arch.vocab + arch.positions) * h, L * 2 * 2 * h + 2 * h
    pooler = h * h + h if arch.model_type == "bert" and head == "classification" else 0
    heads = _head_linears(arch, num_labels, head)
    head_params = sum(lin.params for lin in heads)
    linear_weights = (L * sum(lin.in_features * lin.out_features for lin in arch.linears)
                      + sum(lin.in_features * lin.out_features for lin in heads) + (h * h if pooler else 0))
    total = embeddings + attn + mlp + norms + pooler + head_params
    return ParamCounts(embeddings, attn, mlp, norms, pooler, head_params, total, linear_weights)


def match_layer_targets(arch: Arch, targets) -> list[Linear]:
    """The layer linears that LoRA `targets` select, by the rule lowrank.adapters.lora applies to a real model."""
    chosen = set(select_targets([lin.name for lin in arch.linears], targets, f" of {arch.model_type}"))
    return [lin for lin in arch.linears if lin.name in chosen]


def lora_adapter_params(config, targets, rank: int) -> int:
    """r·(in + out) per targeted linear (A: r×in, B: out×r), times the number of layers."""
    arch = config if isinstance(config, Arch) else arch_from_config(config)
    return arch.layers * sum(rank * (lin.in_features + lin.out_features) for lin in match_layer_targets(arch, targets))


# ---------------------------------------------------------------------------------------------- activations

def _layer_bytes_per_token(arch: Arch, adapted: set[str], full: bool, rank: int, c: int, r: int,
                           padded: bool, grouped: bool = True) -> float:
    """Bytes one layer saves for the backward, per token. c: compute dtype bytes (2 under bf16 autocast),
    r: bytes of the residual stream feeding the projections (the weight dtype for Llama; fp32 for the
    LayerNorm models, whose norms autocast runs in fp32). `adapted`: names of linears with a LoRA adapter;
    `grouped`: whether LoRA siblings on one input compute as a group (they do without LoRA dropout)."""
    h, i, a = arch.hidden, arch.intermediate, arch.heads

    def inputs_saved(names: list[str], width: int, input_bytes: int) -> float:
        # A linear saves its input only to form its weight gradient: every linear in full fine-tuning, only the
        # LoRA factor A in LoRA. Autocast casts an fp32 input to bf16 separately for each linear reading it;
        # an input already in the compute dtype is one shared tensor, and so is the input of LoRA layers that
        # compute as one group (lowrank.adapters.lora.SharedInputGroup: siblings such as q, k, v, listed together here).
        readers = sum(full + (n in adapted) for n in names)
        if readers == 0:
            return 0
        return c * width * (readers if input_bytes != c and (full or not grouped) else 1)

    lora_mid = c * rank * len(adapted)  # A x, the input of B: (.., r) per adapter

    q_dim = a * arch.head_dim
    kv_dim = arch.kv_heads * arch.head_dim
    if padded and arch.kv_heads != a:
        kv_dim = q_dim  # with a mask, transformers repeats k/v to every head before SDPA (no native GQA)
    # SDPA (flash / memory-efficient, what every model here runs): q, k, v, output, log-sum-exp (fp32 per head)
    attention = c * (q_dim + 2 * kv_dim) + c * q_dim + 4 * a
    act = ACTIVATION_SAVES.get(arch.activation, 1) * c * i
    drop = 1 if arch.hidden_dropout > 0 else 0  # a bool mask per element

    if arch.family == "llama":
        # RMSNorm (HF): fp32 copy of its input (4h), plus the normalised tensor when its weight trains (r h).
        norm = 4 * h + (r * h if full else 0)
        qkv_in = inputs_saved(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], h, r)
        o_in = inputs_saved(["self_attn.o_proj"], q_dim, c)  # SDPA output made contiguous: a second tensor
        gate_up_in = inputs_saved(["mlp.gate_proj", "mlp.up_proj"], h, r)
        mlp = 3 * c * i  # SiLU input; SiLU output and up output (both saved by their product)
        down_in = inputs_saved(["mlp.down_proj"], i, c)
        return 2 * norm + qkv_in + attention + o_in + gate_up_in + mlp + down_in + lora_mid
    if arch.family == "bert":
        # post-LN: inputs of q/k/v come from the previous LayerNorm (fp32); each sub-block ends with
        # dropout (mask) and a LayerNorm that saves its fp32 input.
        qkv_in = inputs_saved(["attention.self.query", "attention.self.key", "attention.self.value"], h, r)
        o_in = inputs_saved(["attention.output.dense"], h, c)
        up_in = inputs_saved(["intermediate.dense"], h, r)
        down_in = inputs_saved(["output.dense"], i, c)
        return qkv_in + attention + o_in + 2 * (drop * h + 4 * h) + up_in + act + down_in + lora_mid
    # GPT-2, pre-LN: ln_1, one fused q/k/v projection whose output SDPA reads as views
    qkv_in = inputs_saved(["attn.c_attn"], h, r)
    o_in = inputs_saved(["attn.c_proj"], h, c)
    up_in = inputs_saved(["mlp.c_fc"], h, r)
    down_in = inputs_saved(["mlp.c_proj"], i, c)
    return 2 * (4 * h + drop * h) + qkv_in + attention + o_in + up_in + act + down_in + lora_mid


def _outside_layers_bytes_per_token(arch: Arch, full: bool, c: int, r: int) -> float:
    """Embedding dropout, final norm, and what the head saves, per token (heads on the first token: ~0)."""
    h = arch.hidden
    drop = 1 if arch.hidden_dropout > 0 else 0
    if arch.family == "bert":
        return 4 * h + drop * h  # embedding LayerNorm input; pooler/classifier read only the first token
    final_norm = 4 * h + (r * h if full and arch.family == "llama" else 0)
    return drop * h + final_norm + c * h  # the head (score / lm_head) saves its input for every position


def _kv_cache_bytes_per_token(arch: Arch, c: int, r: int, padded: bool) -> float:
    """With `use_cache` on (the config default), transformers concatenates every layer's k and v into a
    DynamicCache during the forward, kept until the output object is dropped (the end of the forward). The
    copies are extra where SDPA saves something else: k cast from an fp32 residual stream, k/v repeated to
    every head, or GPT-2's k/v (views of the fused q/k/v output otherwise)."""
    if not arch.kv_cache:
        return 0
    if arch.family == "gpt2":
        return arch.layers * 2 * c * arch.hidden
    kv = arch.kv_heads * arch.head_dim
    repeated = padded and arch.kv_heads != arch.heads
    if r == c and not repeated:
        return 0  # the cache holds the very tensors SDPA saves
    return arch.layers * kv * (r + c)  # k in the residual dtype (rotary), v in the compute dtype


def _loss_kind(head: str, chunked: bool, compiled: bool) -> str:
    return "" if head != "causal_lm" else "chunked" if chunked else "compiled" if compiled else "eager"


def _loss_peak_bytes(arch: Arch, head: str, tokens: int, chunked: bool, compiled: bool = False,
                     hidden_bytes: int = 2, trained_head: bool = False) -> float:
    """Causal LM loss (HF: logits.float(), cross-entropy): eagerly, the fp32 log-softmax is saved, and its backward
    holds two more fp32 (b, s, vocab) gradients at once: 12 bytes per vocabulary entry and token at the start of
    the backward, before any layer's gradients exist. The bf16 logits die with the output object. One eager 7B step
    at 2 × 8192 tokens on one H100 agrees: 4 bytes per entry more at the forward's end, 8 more at the backward's
    start (benchmarks/results/fast_path/fast_path_step_memory_h100_7b_ckpt4096.md). Compiled (`compile_blocks`
    compiles the model's loss_function too), the fused cross-entropy keeps the bf16 logits and writes their bf16
    gradient: 4 bytes per entry. Chunked (lowrank/train/lm_loss.py), for at most CHUNK_TOKENS tokens whatever the
    sequence length: eagerly one chunk's bf16 logits, their fp32 values, softmax and gradient (about 16 bytes per
    entry; 18 counted); compiled, the chunk's bf16 logits and bf16 gradient (4). Beside the chunk, what outlives it
    until the backward: the hidden states' gradient (`hidden_bytes` per hidden unit and token) and, for a trained
    head, its fp32 weight-gradient sum."""
    if head != "causal_lm":
        return 0
    if not chunked:
        return (4 if compiled else 12) * arch.vocab * tokens
    kept = tokens * arch.hidden * hidden_bytes + (4 * arch.vocab * arch.hidden if trained_head else 0)
    return (4 if compiled else 18) * arch.vocab * min(tokens, CHUNK_TOKENS) + kept


# ---------------------------------------------------------------------------------------------- estimate

@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    trainable_params: int
    adapter_params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    weight_copies_bytes: int
    activations_bytes: int
    total_bytes: int
    # the settings it was computed for
    method: str
    micro_batch: int
    seq_len: int
    grad_accum: int
    activation_checkpointing: bool
    weight_dtype: str
    precision: str
    gather_bytes: int = 0  # FSDP: blocks gathered whole on top of each rank's shards
    shards: int = 1        # FSDP ranks the weights, gradients and moments are sharded over (1: none)
    loss: str = ""         # a causal LM's loss as counted: "chunked", "compiled" or "eager" (else "")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A readable breakdown in GiB."""
        rows = [("weights", self.weights_bytes), ("gradients", self.grads_bytes),
                ("optimizer (AdamW moments)", self.optimizer_bytes),
                ("bf16 weight copies (autocast)", self.weight_copies_bytes),
                ("FSDP blocks gathered whole", self.gather_bytes),
                ("activations", self.activations_bytes), ("peak (total)", self.total_bytes)]
        head = (f"{self.method}, micro-batch {self.micro_batch} x seq {self.seq_len}, grad_accum {self.grad_accum}, "
                f"checkpointing {'on' if self.activation_checkpointing else 'off'}, weights {self.weight_dtype}, "
                f"precision {self.precision}" + (f", loss {self.loss}" if self.loss else "")
                + (f", sharded over {self.shards} ranks (per rank)" if self.shards > 1 else "")
                + f"\nparams {self.params:,} (trainable {self.trainable_params:,}"
                + (f", adapter {self.adapter_params:,}" if self.method == "lora" else "") + ")")
        return head + "\n" + "\n".join(f"  {name:<31}{b / GIB:9.2f} GiB" for name, b in rows)


def _autocast_copies(c: int, w: int, tw: int, checkpointing: bool, full: bool, linear_weights: int, adapter: int,
                     one_layer: int) -> int:
    """Bytes of autocast's weight copies. fp32 weights under bf16 autocast: a bf16 copy of every linear weight lives
    from forward to backward. With checkpointing, frozen weights' copies are dropped at once (only one recomputed
    layer's exist) and trainable ones stay in autocast's cache until the forward ends."""
    if c < w:
        if not checkpointing:
            return c * (linear_weights + adapter)
        return c * linear_weights if full else c * (one_layer + adapter)
    if c < tw:  # a bf16 base with fp32 factors: only the factors are cast
        return c * adapter
    return 0


def _fsdp_gather(arch, c: int, w: int, tw: int, full: bool, targets, rank: int, one_layer: int) -> tuple[int, bool]:
    """Bytes of the two blocks FSDP holds gathered whole, and whether it gathers bf16 casts of fp32 weights
    (bf16 compute: MixedPrecisionPolicy)."""
    casts = c < w and tw == w
    block = one_layer + sum(lin.out_features for lin in arch.linears if lin.bias)  # biases; norms are tiny
    block_trainable = block if full else lora_adapter_params(arch, targets, rank) // arch.layers
    return 2 * block * (c if casts else w) + 2 * block_trainable * tw, casts


def estimate_memory(config, method: str, batch_size: int, seq_len: int, *, rank: int = 8,
                    targets=ALL_LINEAR, num_labels: int = 2, weight_dtype: str = "fp32", precision: str = "bf16",
                    trainable_dtype: str | None = None,
                    activation_checkpointing: bool = False, grad_accum: int = 1, head: str = "classification",
                    padded: bool = True, kv_cache: bool | None = None,
                    lora_dropout: float = 0.0, shards: int = 1, chunked_loss=False, compiled=False) -> MemoryEstimate:
    """Peak memory of one training step with AdamW. `config`: an HF config or a shape mapping.
    `batch_size` is the micro-batch (what one forward sees); `precision` "bf16" means bf16 compute (autocast
    with fp32 weights, or bf16 weights), "fp32" means fp32 throughout. `kv_cache`: whether the forward fills
    a k/v cache (None: the config's `use_cache`; training should turn it off, it only costs memory).
    `lora_dropout`: LoRA layers with dropout compute one by one (no shared-input groups); the dropout masks
    themselves are not counted. `shards`: FSDP ranks (per-rank bytes of a sharded run; 1 = one process or DDP).
    `chunked_loss`: trainer.chunked_loss; `compiled`: trainer.compile (what each does to the loss: _loss_peak_bytes)."""
    for key, value, valid in (("method.name", method, METHODS), ("weight_dtype", weight_dtype, DTYPE_BYTES),
                              ("trainer.precision", precision, DTYPE_BYTES), ("head", head, HEADS)):
        check_choice(key, value, valid)
    if weight_dtype == "bf16" and precision == "fp32":
        raise ConfigError("weight_dtype='bf16' computes in bf16; use precision='bf16' with it")
    arch = config if isinstance(config, Arch) else arch_from_config(config)
    if kv_cache is not None:
        arch = dataclasses.replace(arch, kv_cache=kv_cache)
    counts = count_params(arch, num_labels, head)
    w, c = DTYPE_BYTES[weight_dtype], DTYPE_BYTES[precision]
    tw = DTYPE_BYTES[trainable_dtype or weight_dtype]  # LoRA factors and head (fp32 over a bf16 base, in the trainer)
    full = method == "full"
    adapted = set()
    adapter = 0
    if not full:
        chosen = match_layer_targets(arch, targets)
        check_positive("method.rank", rank, integer=True)
        check_rank_fits(rank, {lin.name: min(lin.in_features, lin.out_features) for lin in chosen})
        adapted = {lin.name for lin in chosen}
        adapter = lora_adapter_params(arch, targets, rank)
    head_params = counts.head if head == "classification" else 0  # the trainer trains the classifier
    trainable = counts.total if full else adapter + head_params
    params = counts.total + adapter

    tw = w if full else tw
    weights = (params - trainable) * w + trainable * tw
    grads = trainable * tw
    optimizer = 2 * trainable * tw
    one_layer = sum(lin.in_features * lin.out_features for lin in arch.linears)
    copies = _autocast_copies(c, w, tw, activation_checkpointing, full, counts.linear_weights, adapter, one_layer)

    r = w if arch.family == "llama" else 4  # LayerNorm (autocast fp32 op) makes the residual stream fp32
    tokens = batch_size * seq_len
    per_layer = _layer_bytes_per_token(arch, adapted, full, rank, c, r, padded, grouped=lora_dropout == 0)
    if activation_checkpointing:  # HF checkpoints each layer: keep its input, recompute one at a time
        layers = arch.layers * r * arch.hidden + per_layer
    else:
        layers = arch.layers * per_layer
    # On top of what is saved, one of these transients: the backward of a layer holds a few gradients of its
    # own (measured: about two MLP-wide ones in the compute dtype and two fp32 hidden-wide ones); the LM
    # loss's backward peaks before any layer's; the k/v cache lives until the end of the forward.
    workspace = 2 * c * arch.intermediate + 2 * 4 * arch.hidden
    cache = 0 if activation_checkpointing else _kv_cache_bytes_per_token(arch, c, r, padded)
    loss = _loss_peak_bytes(arch, head, tokens, chunked_loss, compiled, hidden_bytes=r, trained_head=full)
    transient = max(tokens * max(workspace, cache), loss)
    activations = tokens * (layers + _outside_layers_bytes_per_token(arch, full, c, r)) + transient
    if padded:
        activations += batch_size * seq_len * seq_len  # the (b, 1, s, s) bool mask, built once
    activations = int(math.ceil(activations))

    # The end of the backward: (nearly) every gradient exists while the first layer's backward still holds
    # its saved tensors, its temporaries and (autocast) its weight copies.
    last_layer = int(tokens * (per_layer + workspace)) + (c * one_layer if c < w else 0)
    gather = 0
    if shards > 1:
        weights, grads, optimizer = (-(-x // shards) for x in (weights, grads, optimizer))  # ceil: padded shards
        gather, casts = _fsdp_gather(arch, c, w, tw, full, targets, rank, one_layer)
        if casts:
            copies = 0
            last_layer -= c * one_layer  # the gathered bf16 block is counted in `gather`
    if grad_accum > 1:
        total = weights + optimizer + grads + copies + activations + gather
    else:
        total = weights + optimizer + gather + max(copies + activations, grads + last_layer)
    return MemoryEstimate(params, trainable, adapter, weights, grads, optimizer, copies, activations, total,
                          method, batch_size, seq_len, grad_accum, activation_checkpointing, weight_dtype,
                          precision, gather, shards, _loss_kind(head, chunked_loss, compiled))


def estimate_from_cfg(cfg, config=None, *, micro_batch: int | None = None, grad_accum: int | None = None,
                      activation_checkpointing: bool | None = None, device_type: str = "cuda",
                      padded: bool = True, kv_cache: bool | None = False,
                      world_size: int | None = None) -> MemoryEstimate:
    """The estimate for a composed run config (`cfg.model`, `cfg.method`, `cfg.trainer`, `cfg.task`).
    `config`: the HF config if already at hand (else read without weights via lowrank.data.shapes). Settings left
    None come from the trainer config: `trainer.micro_batch_size` (null = the batch), grad_accum = batch /
    micro-batch, `trainer.activation_checkpointing`, `model.dtype` (as the trainer resolves it).
    precision "auto" means bf16 on CUDA and fp32 on CPU, and no k/v cache, as in the trainer (which turns
    `use_cache` off; a fresh config still has it on). `world_size` (None: `trainer.world_size`, 1 for auto):
    each rank's micro-batch defaults to its share of the batch, and `trainer.parallel=fsdp` shards over it."""
    from lowrank.data.shapes import load_hf_config
    t, m = cfg.trainer, cfg.method
    if config is None:
        config = load_hf_config(cfg.model, cfg.task.get("num_labels", 2))
    if world_size is None:
        world_size = t.get("world_size", "auto")
        world_size = world_size if isinstance(world_size, int) and not isinstance(world_size, bool) else 1
    local_batch = max(1, t.batch_size // world_size)  # each rank's share of the batch
    micro_batch = micro_batch or t.get("micro_batch_size") or local_batch
    grad_accum = grad_accum or max(1, local_batch // micro_batch)
    if activation_checkpointing is None:
        activation_checkpointing = bool(t.get("activation_checkpointing", False))
    precision = resolve_precision(t.precision, device_type)
    targets = m.targets if isinstance(m.targets, str) else list(m.targets)
    # method=subspace is estimated as full fine-tuning, an upper bound: its targets' weight gradients exist as there,
    # but the optimizer holds moments of θ_d only
    method = "full" if m.name == "subspace" else m.name
    head = "causal_lm" if cfg.task.get("objective") in ("cpt", "sft") else "classification"
    parallel = t.get("parallel", "auto")
    one_process = world_size == 1 and parallel in ("auto", "none")
    # the trainer's own rules (lowrank.train.setup resolves the same settings with them)
    chunked = chunked_loss_on(t.get("chunked_loss", "auto"),
                              head == "causal_lm" and one_process and head_extra(config) is None, device_type)
    compiled = compile_on(t.get("compile", "auto"), device_type, one_process)
    return estimate_memory(config, method, micro_batch, t.max_length, rank=m.get("rank") or 0, targets=targets,
                           num_labels=cfg.task.get("num_labels", 2), trainable_dtype="fp32",
                           weight_dtype=resolve_weight_dtype(cfg.model.get("dtype", "auto"), m.name, precision),
                           precision=precision, activation_checkpointing=activation_checkpointing,
                           grad_accum=grad_accum, padded=padded, kv_cache=kv_cache,
                           lora_dropout=float(m.get("dropout") or 0.0),
                           shards=world_size if parallel == "fsdp" else 1, head=head, chunked_loss=chunked,
                           compiled=compiled)
