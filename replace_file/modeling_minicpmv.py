"""MiniCPM-Llama3-V 2.5: SigLIP vision tower (transformers' Idefics2) -> perceiver resampler -> Llama-3.

Loads the official checkpoint unchanged (`llm.*`, `vpm.*`, `resampler.*`) and computes what the official
remote code computes, including two behaviours the released weights were trained with: every image is fed
to the vision tower as one 14-pixel-high strip of patches, and the patch mask is all true, so position ids
are the strip's columns bucketed into 70 and padded patches are attended to.

`forward` takes standard keyword arguments and, given `labels` (Hugging Face convention: shifted inside),
computes the loss from the hidden states of supervised positions only, never materialising full logits. It also
takes padding-free batches: samples concatenated in one row, with position ids restarting per sample and
transformers' `cu_seq_lens_q`/`max_length_q` keywords marking the boundaries (attention "sdpa_varlen", below).

`generate_greedy` decodes a batch of prompts without padding: prompts concatenated, keys and values in a
`GenerationCache` that gives each sequence a slot of its own, one new token per sequence a step.
"""
import contextlib
import json
import warnings
from copy import deepcopy
from functools import lru_cache
from threading import Thread

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AttentionInterface, LlamaForCausalLM, PreTrainedModel, TextIteratorStreamer
from transformers import initialization as init
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings, Idefics2VisionTransformer
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_minicpm import MiniCPMVConfig
from .image_processing_minicpmv import image_bounds, pack_pixel_strips, process_image
from .resampler import Resampler, ResamplerAttention
from .tokenization_minicpmv_fast import IGNORE_INDEX
from .tokenization_minicpmv_fast import MiniCPMVTokenizerFast, PreTrainedTokenizerFastWrapper  # noqa: F401 (auto_map)


@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached: a tensor made under inference mode could not be saved by a later backward
def _strip_position_ids(rows, cols, num_patches_per_side, device):
    """Position ids of a rows x cols patch grid exactly as transformers 4.40's Idefics2 computed them (later
    releases compute the fractional coordinates differently, e.g. in the pixel dtype)."""
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side)
    frac_h = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(rows))
    frac_w = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(cols))
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)
    return (bucket_h[:, None] * num_patches_per_side + bucket_w).flatten().to(device)


# The attention implementation this module registers with transformers, by name (`attn_implementation=...`).
SDPA_VARLEN = "sdpa_varlen"


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          cu_seq_lens_q=None, max_length_q=None, kv_cache=None, **kwargs):
    """SDPA, except for padding-free batches on the GPU: there the samples concatenated in one row (boundaries in
    `cu_seq_lens_q`) go through flash attention's variable-length kernel, each attending causally within itself.
    Elsewhere SDPA applies the block-causal mask transformers builds from the restarting position ids: the same
    math. Given a `kv_cache` (generate_greedy), attention goes through it. Registered as attn_implementation
    SDPA_VARLEN (with SDPA's masks for every other batch)."""
    if kv_cache is not None:
        return kv_cache.attend(module, query, key, value, scaling)
    if cu_seq_lens_q is None or not _flash_can_run(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # [1, heads, tokens, dim] -> [tokens, heads, dim]; key and value keep their fewer heads (grouped-query)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
                                                  dropout, getattr(module, "is_causal", True), False, scale=scaling)[0]
    return out[None], None


AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
AttentionMaskInterface.register(SDPA_VARLEN, sdpa_mask)


def _flash_can_run(query):
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


class GenerationCache:
    """Keys and values of a batch of sequences being generated, in flash attention's variable-length layout: per
    layer [rows, kv heads, head dim], each sequence in a slot of its own rows (its prompt and its new tokens), so
    that prompts need no padding and a decoding step reads each sequence's own keys only.

    Before each forward, `add_prompts` or `add_step` says where that forward's tokens (one packed row) go; every
    layer's `attend` then writes its keys and values there and attends over its sequences' filled rows."""

    def __init__(self, config, prompt_lengths, max_new_tokens, device, dtype):
        capacity = torch.tensor(prompt_lengths) + max_new_tokens
        self.starts = F.pad(capacity.cumsum(0), (1, 0)).to(device, torch.int32)  # slot i: rows starts[i]..starts[i+1]
        self.lengths = torch.zeros(len(prompt_lengths), dtype=torch.int32, device=device)  # rows filled per slot
        self.prompt_lengths, self.largest_slot = prompt_lengths, int(capacity.max())
        shape = (config.num_hidden_layers, int(capacity.sum()), config.num_key_value_heads,
                 getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)

    def add_prompts(self, first, last):
        """The next forward holds the prompts of sequences first..last-1, concatenated; returns their position ids."""
        lengths = torch.tensor(self.prompt_lengths[first:last])
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(self.starts.device)
        self.rows = positions + torch.repeat_interleave(self.starts[first:last].long(), lengths.to(self.starts.device))
        self.cu_q = F.pad(lengths.cumsum(0), (1, 0)).to(self.starts.device, torch.int32)
        self.cu_k, self.max_q = self.starts[first:last + 1], int(lengths.max())
        self.lengths[first:last] = lengths.to(self.lengths.device, torch.int32)
        self.used, self.max_k = self.lengths[first:last], self.max_q
        return positions[None]

    def add_step(self):
        """The next forward holds one new token of every sequence; returns their position ids. Nothing here reads the
        GPU or changes from step to step on the host (the longest key length given is the largest slot's), so a CUDA
        graph of a step replays as the next step."""
        positions = self.lengths.long()
        self.rows = (self.starts[:-1] + self.lengths).long()
        self.lengths += 1
        self.cu_q = torch.arange(len(self.lengths) + 1, dtype=torch.int32, device=self.lengths.device)
        self.cu_k, self.max_q, self.used, self.max_k = self.starts, 1, self.lengths, self.largest_slot
        return positions[None]

    @torch.compiler.disable  # in compiled blocks: the same graph for every layer, whose cache this picks
    def attend(self, layer, query, key, value, scaling):
        """query/key/value [1, heads, tokens, dim] of the current forward -> ([1, tokens, heads, dim], None)."""
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        keys, values = self.keys[layer.layer_idx], self.values[layer.layer_idx]
        keys.index_copy_(0, self.rows, k.to(keys.dtype))
        values.index_copy_(0, self.rows, v.to(values.dtype))
        if _flash_can_run(q):
            out = torch.ops.aten._flash_attention_forward(q, keys, values, self.cu_q, self.cu_k, self.max_q,
                                                          self.max_k, 0.0, True, False, scale=scaling,
                                                          seqused_k=self.used)[0]
            return out[None], None
        # elsewhere (CPU, fp32): SDPA per sequence, its new tokens attending causally to its filled rows
        outs = []
        for q_from, q_to, start, used in zip(self.cu_q[:-1].tolist(), self.cu_q[1:].tolist(), self.cu_k.tolist(),
                                             self.used.tolist()):
            n = q_to - q_from
            mask = torch.ones(n, used, dtype=torch.bool, device=q.device).tril(used - n)
            outs.append(F.scaled_dot_product_attention(
                q[q_from:q_to].transpose(0, 1), keys[start:start + used].transpose(0, 1),
                values[start:start + used].transpose(0, 1), attn_mask=mask, scale=scaling,
                enable_gqa=True).transpose(0, 1))
        return torch.cat(outs)[None], None


class PatchEmbedding(nn.Conv2d):
    """The patch convolution (stride = kernel, no padding) as one matrix product: [N, C, H, W] pixels ->
    [N, patches, out] row by row, the layout the blocks take. cuDNN builds a plan for every new input shape
    (~28 ms at its first call on an H200, and strips come in many widths) and runs this convolution in 1.04 ms
    against the matrix product's 0.26 ms (32 strips of 1024 patches); the weights keep the checkpoint's layout."""

    def forward(self, pixels):
        n, c, h, w = pixels.shape
        p = self.kernel_size[0]
        patches = pixels.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)
        return F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)


class StripVisionEmbeddings(Idefics2VisionEmbeddings):
    """Idefics2 patch + position embeddings for the official all-true patch mask: every image of the batch
    gets the position ids of the whole (1 x longest strip) grid, as in the released model."""

    def __init__(self, config):
        super().__init__(config)
        # the convolution Idefics2 made, as is (a second one would draw other random initial weights for every
        # module after it: the embedded demo's model would change)
        self.patch_embedding.__class__ = PatchEmbedding

    def forward(self, pixel_values):
        embeddings = self.patch_embedding(pixel_values)
        rows, cols = (side // self.patch_size for side in pixel_values.shape[2:])
        position_ids = _strip_position_ids(rows, cols, self.num_patches_per_side, embeddings.device)
        return embeddings + self.position_embedding(position_ids)[None]


class FusedRMSNorm(LlamaRMSNorm):
    """Llama's RMSNorm in one kernel (torch's fused rms_norm on the GPU) instead of six passes over the hidden
    states: 2.95 -> 2.66 s for 128 prompts' 108,920 tokens through the LLM on an H200. The same math; in bf16 the
    weight multiplies before the one rounding to bf16 instead of after a first (outputs differ by bf16 rounding;
    identical in fp32)."""

    def forward(self, hidden_states):
        if hidden_states.dtype != self.weight.dtype:  # e.g. bf16 activations, fp32 weights: Llama's math and dtype
            return super().forward(hidden_states)
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


class StripVisionTransformer(Idefics2VisionTransformer):
    """The Idefics2 vision tower as the released model runs it: with the all-true patch mask there is no
    attention mask at all (nothing to build or inspect on the GPU, so no synchronisation)."""

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = StripVisionEmbeddings(config)

    def forward(self, pixel_values, patch_attention_mask=None, **kwargs):
        if patch_attention_mask is not None:
            raise ValueError("MiniCPM-Llama3-V 2.5 feeds its vision tower an all-true patch mask: pass none")
        hidden = self.encoder(inputs_embeds=self.embeddings(pixel_values), **kwargs).last_hidden_state
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden))


class MiniCPMV(PreTrainedModel):
    config_class = MiniCPMVConfig
    config: MiniCPMVConfig
    base_model_prefix = "llm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Idefics2EncoderLayer", "Resampler"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        self.llm = LlamaForCausalLM(config)
        for module in self.llm.modules():
            if type(module) is LlamaRMSNorm:
                module.__class__ = FusedRMSNorm  # its own weight (partitioned under ZeRO-3), computed in one kernel
        vision_config = config.vision_config
        vision_config._attn_implementation = config._attn_implementation
        self.vpm = StripVisionTransformer(vision_config)
        if config.drop_vision_last_layer:
            self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
        self.resampler = Resampler(num_queries=config.query_num, embed_dim=config.hidden_size,
                                   num_heads=config.hidden_size // 128, kv_dim=vision_config.hidden_size)
        self.post_init()

    @classmethod
    def can_generate(cls):
        """Generation goes through `self.llm`; True so generation_config.json is loaded and saved with the model."""
        return True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim ** -0.5)
        elif isinstance(module, ResamplerAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        else:
            super()._init_weights(module)

    # peft / Trainer accessors
    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.llm.set_output_embeddings(value)

    # ---- vision ---------------------------------------------------------------------------------------
    def get_vision_embedding(self, pixel_values, tgt_sizes):
        """[N, 3, P, Lmax*P] strips + [N, 2] patch grids -> [N, query_num, hidden] image features."""
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        # The official 2.5 mask is all true (its per-image masking indexes the wrong dimension): no mask.
        hidden = self.vpm(pixel_values.to(dtype)).last_hidden_state
        return self.resampler(hidden, tgt_sizes)

    def _dummy_vision_feature(self, device):
        """One blank 224x224 image through the vision path, so a step without images still runs (and
        gathers, under ZeRO-3) every vision parameter on every rank: no hang, no missing gradients."""
        side = 224 // self.config.patch_size
        strip = torch.zeros(1, 3, self.config.patch_size, side * side * self.config.patch_size, device=device)
        return self.get_vision_embedding(strip, torch.tensor([[side, side]], dtype=torch.int32))

    def get_llm_embedding(self, input_ids, pixel_values=None, tgt_sizes=None, image_bound=None):
        """Token embeddings with each image's features written over its `<unk>` positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        pixel_values, tgt_sizes, image_bound = _normalise_images(pixel_values, tgt_sizes, image_bound)
        if pixel_values is None:
            if self.training:
                embeds = embeds + 0 * self._dummy_vision_feature(input_ids.device).sum()
            return embeds
        return self.place_image_features(embeds, self.get_vision_embedding(pixel_values.to(input_ids.device), tgt_sizes),
                                         image_bound)

    def place_image_features(self, embeds, features, image_bound):
        """[B, T, hidden] token embeddings with the [N, query_num, hidden] image features written over the spans of
        `image_bound` (per sample, [images, 2] start/end), in order."""
        rows, cols = [], []
        for b, bounds in enumerate(image_bound):
            for start, end in bounds.tolist():
                if end - start != self.config.query_num:
                    raise ValueError(f"sample {b}: image span [{start}, {end}) is not {self.config.query_num} tokens")
                cols.append(torch.arange(start, end))
                rows.append(torch.full((end - start,), b))
        if len(rows) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} images but {len(rows)} image spans in the token ids")
        index = (torch.cat(rows).to(embeds.device, non_blocking=True), torch.cat(cols).to(embeds.device, non_blocking=True))
        return embeds.index_put(index, features.reshape(-1, features.shape[-1]).to(embeds.dtype))

    # ---- training / scoring -----------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None, tgt_sizes=None,
                image_bound=None, labels=None, inputs_embeds=None, return_logits=None, num_items_in_batch=None,
                **kwargs):
        """Loss at supervised positions only (`labels` -100 elsewhere, shifted inside as in Hugging Face).

        Logits are returned when there are no labels or `return_logits=True`; `num_items_in_batch` (from the
        Trainer under gradient accumulation) replaces the local count of supervised tokens as the divisor.
        """
        if inputs_embeds is None:
            inputs_embeds = self.get_llm_embedding(input_ids, pixel_values, tgt_sizes, image_bound)
        kwargs.pop("use_cache", None)
        if labels is not None and attention_mask is not None and _right_padded(attention_mask):
            # Under the causal mask no real token sees right padding, so the padding mask changes nothing
            # that is scored (the official code never passed it); without it attention runs the causal kernel.
            attention_mask = None
        hidden = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False, **kwargs).last_hidden_state
        loss = logits = None
        if labels is not None:
            loss = supervised_loss(hidden, labels, self.llm.lm_head, num_items_in_batch)
        if labels is None or return_logits:
            logits = self.llm.lm_head(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ---- inference ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids=None, pixel_values=None, tgt_sizes=None, image_bound=None, attention_mask=None,
                 tokenizer=None, streamer=None, inputs_embeds=None, **generate_kwargs):
        """Generate new token ids (prompt excluded). Batches are left-padded; images as in `forward`, or the prompt
        given as `inputs_embeds` (from `get_llm_embedding`)."""
        embeds = inputs_embeds if inputs_embeds is not None else \
            self.get_llm_embedding(input_ids, pixel_values, tgt_sizes, image_bound)
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if tokenizer is not None:
            generate_kwargs.setdefault("eos_token_id", [tokenizer.eos_token_id, tokenizer.eot_id])
        generate_kwargs.setdefault("pad_token_id", 0)
        generate_kwargs.setdefault("use_cache", True)  # the released config says False (a training setting)
        with warnings.catch_warnings():  # the prompt is embeddings, so only new tokens are penalised: as official
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, streamer=streamer,
                                     **generate_kwargs)

    @torch.inference_mode()
    def generate_greedy(self, prompts, max_new_tokens, eos_token_id, pad_token_id=0, prompt_tokens_per_pass=16384,
                        cuda_graph=True):
        """Greedy decoding of a batch of prompts given as embeddings ([T_i, hidden] each, from get_llm_embedding):
        generate()'s greedy answers, without padding. The prompts go through the LLM concatenated (at most
        `prompt_tokens_per_pass` tokens a pass, beyond one prompt), then every sequence gets one new token a step,
        attending to its own keys in a GenerationCache (flash attention's variable-length kernel on the GPU). There
        the steps after the first replay a CUDA graph of one step (`cuda_graph`): launching a step's ~600 kernels
        one by one takes the host several times as long as the GPU needs to run them. Needs attn_implementation
        SDPA_VARLEN. Returns [batch, steps] new token ids, `pad_token_id` after a sequence's eos, as generate()
        returns them."""
        if self.config._attn_implementation != SDPA_VARLEN:
            raise ValueError(f"generate_greedy needs attn_implementation={SDPA_VARLEN!r}, "
                             f"not {self.config._attn_implementation!r}")
        lengths = [len(p) for p in prompts]
        cache = GenerationCache(self.llm.config, lengths, max_new_tokens, prompts[0].device, prompts[0].dtype)
        first_tokens, first = [], 0
        while first < len(prompts):
            last = first + 1
            while last < len(prompts) and sum(lengths[first:last + 1]) <= prompt_tokens_per_pass:
                last += 1
            hidden = self._llm_hidden(torch.cat(prompts[first:last])[None], cache.add_prompts(first, last), cache)
            ends = torch.tensor(lengths[first:last]).cumsum(0) - 1
            first_tokens.append(self.llm.lm_head(hidden[0, ends.to(hidden.device)]).argmax(-1))
            first = last
        tokens = torch.cat(first_tokens)
        eos = torch.tensor(eos_token_id, device=tokens.device).reshape(-1)
        done = (tokens[:, None] == eos).any(-1)
        out, graph = [tokens.clone()], None
        for step in range(1, max_new_tokens):
            if step % 8 == 0 and bool(done.all()):  # checked now and then: each check waits for the GPU
                break
            if graph is not None:
                graph.replay()
            elif cuda_graph and _flash_can_run(prompts[0]):  # (elsewhere the cache's attention reads the host)
                graph = _run_and_capture(lambda: self._greedy_step(cache, tokens, done, eos, pad_token_id))
            else:
                self._greedy_step(cache, tokens, done, eos, pad_token_id)
            out.append(tokens.clone())
        return torch.stack(out, dim=1)

    def _greedy_step(self, cache, tokens, done, eos, pad_token_id):
        """Every sequence's next token, written over `tokens`, and `done` updated: in place, so that a CUDA graph of
        this step reads and writes the same buffers each replay."""
        hidden = self._llm_hidden(self.get_input_embeddings()(tokens)[None], cache.add_step(), cache)
        tokens.copy_(self.llm.lm_head(hidden[0]).argmax(-1).masked_fill(done, pad_token_id))
        done |= (tokens[:, None] == eos).any(-1)

    def _llm_hidden(self, embeds, position_ids, cache):
        """The LLM's final hidden states for one packed row [1, T, hidden], attention through `cache`. The decoder
        blocks are called directly: the model's forward would first build a [T, T] mask, 13 GB for 115k tokens."""
        llm = self.llm.model
        position_embeddings = llm.rotary_emb(embeds, position_ids=position_ids)
        hidden = embeds
        for layer in llm.layers[:llm.config.num_hidden_layers]:
            hidden = layer(hidden, position_embeddings=position_embeddings, position_ids=position_ids, kv_cache=cache)
        return llm.norm(hidden)

    def build_chat_inputs(self, msgs, tokenizer, image=None, max_inp_length=2048, system_prompt="",
                          max_slice_nums=None):
        """The official chat prompt: images as placeholders joined to the text by '\\n', the checkpoint's
        (inference) chat template, ids cut to `max_inp_length`."""
        msgs = deepcopy(json.loads(msgs) if isinstance(msgs, str) else msgs)
        if not msgs:
            raise ValueError("msgs is empty")
        if image is not None and isinstance(msgs[0]["content"], str):
            msgs[0]["content"] = [image, msgs[0]["content"]]
        slice_cfg = self.config.slice_config
        strips, tgt_sizes = [], []
        for i, msg in enumerate(msgs):
            if msg["role"] not in ("user", "assistant"):
                raise ValueError(f"message {i}: role must be user or assistant, got {msg['role']!r}")
            if i == 0 and msg["role"] != "user":
                raise ValueError("the first message must be from the user")
            parts = [msg["content"]] if isinstance(msg["content"], str) else msg["content"]
            texts = []
            for part in parts:
                if isinstance(part, Image.Image):
                    processed = process_image(part, self.config.query_num,
                                              max_slice_nums or slice_cfg["max_slice_nums"],
                                              slice_cfg["scale_resolution"], self.config.patch_size)
                    strips += processed.pixel_values
                    tgt_sizes.append(processed.tgt_sizes)
                    texts.append(processed.placeholder)
                else:
                    texts.append(part)
            msg["content"] = "\n".join(texts)
        if system_prompt:
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        input_ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[:max_inp_length])
        return dict(input_ids=input_ids[None].to(self.device),
                    pixel_values=pack_pixel_strips(strips).to(self.device) if strips else None,
                    tgt_sizes=torch.cat(tgt_sizes) if tgt_sizes else None,
                    image_bound=[image_bounds(input_ids, tokenizer.im_start_id, tokenizer.im_end_id)])

    def chat(self, image, msgs, tokenizer, vision_hidden_states=None, max_new_tokens=1024, sampling=True,
             max_inp_length=2048, system_prompt="", stream=False, **kwargs):
        """The official chat: sampling (top_p 0.8, top_k 100, temperature 0.7, repetition 1.05) or 3-beam search
        (repetition 1.2); keyword arguments override only those settings. Returns the answer, or a generator
        of text pieces with `stream=True` (which needs sampling)."""
        if vision_hidden_states is not None:
            raise ValueError("vision_hidden_states is not supported; pass the image")
        if stream and not sampling:
            raise ValueError("stream=True needs sampling=True")
        inputs = self.build_chat_inputs(msgs, tokenizer, image, max_inp_length, system_prompt,
                                        kwargs.pop("max_slice_nums", None))
        if sampling:
            gen = dict(top_p=0.8, top_k=100, temperature=0.7, do_sample=True, repetition_penalty=1.05)
        else:
            gen = dict(num_beams=3, repetition_penalty=1.2)
        gen.update((k, kwargs[k]) for k in gen.keys() & kwargs.keys())
        gen.update(max_new_tokens=max_new_tokens, tokenizer=tokenizer)
        if stream:
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=False)
            Thread(target=self.generate, kwargs=dict(inputs, streamer=streamer, **gen)).start()
            return (t.replace(tokenizer.eot_token, "").replace(tokenizer.eos_token, "") for t in streamer)
        return decode_answer(self.generate(**inputs, **gen)[0], tokenizer)


@lru_cache(maxsize=None)
def _capture_stream(device):
    """One side stream per device: every new stream would get, and keep, a cuBLAS workspace of its own."""
    return torch.cuda.Stream(device)


def _run_and_capture(step):
    """Runs `step`, then records it as a CUDA graph (not run), both on a side stream, as CUDA requires. The run first
    makes the step's lazy allocations (cuBLAS's workspace for that stream, ...), which must not land in the graph."""
    stream, graph = _capture_stream(torch.cuda.current_device()), torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        graph.capture_begin(capture_error_mode="thread_local")  # other threads (pinning images) keep allocating
        try:
            step()
        except BaseException:
            with contextlib.suppress(Exception):  # the capture is void; its own error would hide the step's
                graph.capture_end()
            raise
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def supervised_loss(hidden, labels, lm_head, num_items_in_batch=None):
    """Mean cross-entropy over supervised tokens, with logits computed for those positions only: a few
    [n_supervised, vocab] rows instead of [batch, seq, vocab] (over 1 GB in fp32 for one 2048-token sample)."""
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][supervised]).float()
    loss = F.cross_entropy(logits, target[supervised], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else supervised.sum()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)


def decode_answer(ids, tokenizer):
    """The official decoding: drop every id 0 ("!", the pad), a leading bos and one trailing eos/eot; strip."""
    ids = ids[ids != 0]
    if len(ids) and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if len(ids) and ids[-1] in (tokenizer.eos_token_id, tokenizer.eot_id):
        ids = ids[:-1]
    return tokenizer.decode(ids).strip()


def _right_padded(attention_mask):
    """True when every row is ones then zeros (padding only on the right)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _normalise_images(pixel_values, tgt_sizes, image_bound):
    """Accept the official nested lists (per sample, per image) or the packed tensors; return packed
    [N, 3, P, Lmax*P] pixels, [N, 2] tgt_sizes and per-sample bounds, or Nones when there are no images."""
    if pixel_values is None:
        return None, None, None
    if isinstance(pixel_values, (list, tuple)):
        flat = [s for item in pixel_values for s in (item if isinstance(item, (list, tuple)) else [item])]
        if not flat:
            return None, None, None
        pixel_values = pack_pixel_strips(flat)
    if pixel_values.shape[0] == 0:
        return None, None, None
    if isinstance(tgt_sizes, (list, tuple)):
        tgt_sizes = torch.cat([torch.as_tensor(t).reshape(-1, 2) for t in tgt_sizes if len(t)])
    image_bound = [torch.as_tensor(b).reshape(-1, 2) for b in image_bound]
    return pixel_values, tgt_sizes.to(torch.int32), image_bound
