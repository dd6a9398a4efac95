"""AdamW with 8-bit moments (bitsandbytes' AdamW8bit: blockwise-quantized states, 2 bytes per trained parameter
instead of 8) on fp32 master weights, for a bf16 model without DeepSpeed (`--optim adamw_bnb_8bit` or
`paged_adamw_8bit`).

Why masters: bitsandbytes updates the parameters it is given in their own dtype, and a bf16 weight cannot take an
update below 1/256 of its size (LoRA's and the vision tower's updates at the launch scripts' learning rates are
smaller); the masters keep those updates, at 4 bytes per trained parameter. Under DeepSpeed this module is not
used: DeepSpeed hands the Trainer's bitsandbytes optimizer its own fp32 master partitions.
"""
import torch
from bitsandbytes.optim import AdamW8bit

from .optimizer import flat_master, restore_masters, take_grads, write_back

# Elements per master chunk: bitsandbytes takes fp32 gradients like its parameters, so a step converts the bf16
# gradients one chunk at a time (at most 256 MiB at once, instead of 4 bytes per trained parameter).
CHUNK = 2 ** 26


class MasterWeightAdamW8bit(AdamW8bit):
    """bitsandbytes' AdamW8bit over flat fp32 masters of 16-bit parameters, split into chunks of CHUNK elements
    (its parameters, each with its own 8-bit states); the new weights are copied back into the parameters after
    each step. `embeddings`: parameters whose moments stay 32-bit (embedding rows are updated rarely and
    unevenly, which 8-bit states track badly). A parameter without a gradient in a step counts as a zero gradient."""

    def __init__(self, param_groups, paged=False, embeddings=(), **kwargs):
        embedding_ids = {id(p) for p in embeddings}
        groups = []
        for group in param_groups:
            for is_embedding in (False, True):
                params = [p for p in group["params"] if (id(p) in embedding_ids) == is_embedding]
                if params:
                    groups.append(dict(group, params=params, optim_bits=32 if is_embedding else 8))
        self.model_groups = [group["params"] for group in groups]
        self.flat_masters = [flat_master(params) for params in self.model_groups]
        super().__init__([dict(group, params=list(master.split(CHUNK)))
                          for group, master in zip(groups, self.flat_masters)], is_paged=paged, **kwargs)

    def get_config(self, gindex, pindex, group):
        return dict(super().get_config(gindex, pindex, group), optim_bits=group["optim_bits"])

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW8bit takes no closure")
        for group, params, master in zip(self.param_groups, self.model_groups, self.flat_masters):
            grad = take_grads(params)
            for chunk, chunk_grad in zip(group["params"], grad.split(CHUNK)):
                chunk.grad = chunk_grad.float()
                super().step()  # bitsandbytes updates the parameters that have a gradient: this chunk
                chunk.grad = None
                self.state[chunk]["master"] = chunk  # in the checkpoint, so that a resumed run continues exactly
            write_back(params, master.to(grad.dtype))

    @torch.no_grad()
    def load_state_dict(self, state_dict, move_to_device=True):
        super().load_state_dict(state_dict, move_to_device)
        restore_masters(self)
