"""The Lumina-DiMOO checkpoint layout and token map, written down from reading the published code.

Sources read (GitHub, through the project's code search; Alpha-VLLM/Lumina-DiMOO itself is indexed
only by its README, so its code was read in forks and in projects that vendor it):
- lindaxhy/Lumina-DiMOO generators/image_generation_generator.py (commit 20b5a37f): generate_image:
  the conditional sequence already holds the masked image segment; code_start = len(prompt) + 2;
  uncond = uncondition prompt ids + x[:, code_start-2:]; two forward passes, logits sliced to
  [text_vocab : text_vocab + 8192]; logits = (1+w) c - w u; keep_n = floor(L cos(pi/2 (s+1)/T))
  (at least 1, 0 at the last step); gumbel_max_sample; mask_by_random_topk re-masks keep_n.
- the same fork's model/__init__.py (LLaDAForMultiModalGeneration(LLaDAModelLM), base_model_prefix
  "model"; a batch is right-padded with id 0 and an attention bias masks the padding; FSDP wraps
  model.transformer.blocks and model.transformer.ff_out) and its text-to-image script (inference
  t2i: "<system>{system}</system><user>{prompt}</user>" and "...<user><uncondition></user>"
  tokenized; img tokens = [BOA, BOI] + rows of (cols MASK + NEWLINE) + [EOI, EOA];
  LLaDAForMultiModalGeneration.from_pretrained(checkpoint, torch_dtype=bfloat16); VQModel
  .from_pretrained(vae_ckpt, subfolder="vqvae")).
- config.py of Lumina-DiMOO (vendored copies; the SPECIAL_TOKENS below and the prompt template
  "Generate an image according to the text prompt."), utils/image_utils.py decode_vq_to_image
  (codes = ids - 126356, viewed [1, h, w], vqvae.decode; downsampling 2**(len(block_out_channels)-1)).
- modeling_llada.py (LLaDA, as vendored with DiMOO's changes, e.g. the file read by id in the code
  index beside configuration_llada.py): LLaDAModel.transformer = {wte, emb_drop, ln_f, blocks, ff_out
  when not weight_tying}; LLaDALlamaBlock: attn_norm, ff_norm, q_proj, k_proj, v_proj, attn_out,
  ff_proj, up_proj, ff_out; x + attn_out(attn(attn_norm x)); then ff_out(silu(ff_proj h) * up_proj h)
  with h = ff_norm x; RMSLayerNorm in float32 times weight; RotaryEmbedding rotate-half,
  inv_freq = 1 / theta ** (arange(0, hd, 2) / hd), in full precision; hidden state appended after ln_f.
- LLaDA-8B config.json fields, as checked by projects that load it (d_model 4096, n_layers 32,
  n_heads 32, n_kv_heads 32, mlp_hidden_size 12288, rope_theta 500000, rms_norm_eps 1e-5,
  include_bias false, weight_tying false, pad/eos 126081, mask 126336; required keys
  model.transformer.{wte,ln_f,ff_out}.weight and blocks.{i}.{q,k,v}_proj/attn_out/ff_proj/up_proj/
  ff_out.weight).
- The MIGM-Shortcut reference for DiMOO (model/shortcut_model.py MDMShortcut and the trainer
  train_shortcut.py that imports it): new tokens embedded by the base's wte, no position table,
  RoPE at their sequence positions; `prompt_visible` (conditional branch only) adds every position
  before the image segment to the key set; logits = ff_out(f)[..., -8192:] (the image codes are the
  last 8192 outputs); loss on all positions.

Not found in the index: Lumina-DiMOO's own config.json. The image codes sit at 126356..134547 and
the reference takes them as the last 8192 outputs, so its vocabulary is 134548 by that reading;
the adapter only requires embedding_size (or vocab_size) >= 134548.

Nothing here comes from the implementation under test: tests compare it with the module.
"""

from dataclasses import dataclass

SPECIAL_TOKENS = {
    "mask_token": 126336,
    "newline_token": 126084,
    "image_token_offset": 126356,
    "answer_start": 126354,  # BOA
    "answer_end": 126355,  # EOA
    "boi": 126349,
    "eoi": 126350,
    "uncondition": 126351,
}
CODEBOOK = 8192
PAD = 126081  # LLaDA pad_token_id (= eos)
VQ_DOWNSAMPLING = 16


@dataclass(frozen=True)
class Sizes:
    """config.json fields the shapes depend on (LLaDA-8B / DiMOO values)."""

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab: int = 134548  # embedding_size or vocab_size
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    def config_json(self) -> dict:
        """A config.json as the published one spells these fields (plus the fixed switches)."""
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": self.d_model, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "n_layers": self.n_layers, "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": 4, "vocab_size": self.vocab, "embedding_size": self.vocab, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "block_type": "llama", "layer_norm_type": "rms",
            "activation_type": "silu", "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
            "rope": True, "alibi": False, "input_emb_norm": False, "scale_logits": False,
            "mask_token_id": SPECIAL_TOKENS["mask_token"], "pad_token_id": PAD, "eos_token_id": PAD,
        }  # fmt: skip


KEYS = {
    "model.transformer.wte.weight": lambda s: (s.vocab, s.d_model),
    "model.transformer.blocks.{i}.attn_norm.weight": lambda s: (s.d_model,),
    "model.transformer.blocks.{i}.ff_norm.weight": lambda s: (s.d_model,),
    "model.transformer.blocks.{i}.q_proj.weight": lambda s: (s.d_model, s.d_model),
    "model.transformer.blocks.{i}.k_proj.weight": lambda s: (s.n_kv_heads * (s.d_model // s.n_heads), s.d_model),
    "model.transformer.blocks.{i}.v_proj.weight": lambda s: (s.n_kv_heads * (s.d_model // s.n_heads), s.d_model),
    "model.transformer.blocks.{i}.attn_out.weight": lambda s: (s.d_model, s.d_model),
    "model.transformer.blocks.{i}.ff_proj.weight": lambda s: (s.mlp_hidden_size, s.d_model),  # SwiGLU gate
    "model.transformer.blocks.{i}.up_proj.weight": lambda s: (s.mlp_hidden_size, s.d_model),
    "model.transformer.blocks.{i}.ff_out.weight": lambda s: (s.d_model, s.mlp_hidden_size),
    "model.transformer.ln_f.weight": lambda s: (s.d_model,),  # its output is the feature f
    "model.transformer.ff_out.weight": lambda s: (s.vocab, s.d_model),  # untied output projection
}


def checkpoint_keys(s: Sizes) -> dict[str, tuple[int, ...]]:
    """model.safetensors (or the union of the shards): key -> shape, at sizes s. No biases."""
    out = {}
    for pattern, rule in KEYS.items():
        for i in range(s.n_layers) if "{i}" in pattern else [None]:
            out[pattern.format(i=i)] = tuple(rule(s))
    return out


def image_segment(rows: int, cols: int) -> list[int]:
    """The image part of a sequence before sampling: BOA BOI, rows of (cols MASK, NEWLINE), EOI EOA."""
    t = SPECIAL_TOKENS
    body = ([t["mask_token"]] * cols + [t["newline_token"]]) * rows
    return [t["answer_start"], t["boi"], *body, t["eoi"], t["answer_end"]]
