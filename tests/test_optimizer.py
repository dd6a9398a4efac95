"""AdamW on fp32 master weights (finetune.optimizer) against torch's fp32 AdamW."""
import io

import torch


def test_master_weight_adamw_matches_fp32_adamw():
    """bf16 parameters, flat fp32 masters per group: the update is fp32 AdamW's, parameter by parameter, with
    each group's weight decay; the parameters are the masters' rounding; a resumed optimizer continues exactly."""
    from finetune.optimizer import MasterWeightAdamW
    torch.manual_seed(0)
    shapes = [[(64, 32), (7,)], [(5, 3)]]
    params = [[torch.nn.Parameter(torch.randn(s).bfloat16()) for s in group] for group in shapes]
    references = [[torch.nn.Parameter(p.detach().float()) for p in group] for group in params]
    decays = [0.1, 0.0]
    ours = MasterWeightAdamW([{"params": g, "weight_decay": d} for g, d in zip(params, decays)], lr=1e-2)
    fp32 = torch.optim.AdamW([{"params": g, "weight_decay": d} for g, d in zip(references, decays)], lr=1e-2)
    for _ in range(5):
        for p, r in zip(sum(params, []), sum(references, [])):
            grad = torch.randn(p.shape)
            p.grad, r.grad = grad.bfloat16(), grad.bfloat16().float()
        ours.step(), fp32.step()
        for group, refs, group_params in zip(ours.param_groups, references, params):
            master = group["params"][0]  # fp32 AdamW up to rounding: an ulp or two of an lr-sized update (the
            # CPU's vector width changes torch's rounding; near zero that is far above 1e-6 of the value)
            torch.testing.assert_close(master, torch.cat([r.detach().flatten() for r in refs]), rtol=1e-6,
                                       atol=2 * torch.finfo(torch.float32).eps * 1e-2)
            assert torch.equal(torch.cat([p.detach().flatten() for p in group_params]), master.bfloat16())
        assert all(p.grad is None for p in sum(params, []))
    # resume: a new optimizer over the checkpoint's bf16 weights continues exactly (masters and moments saved)
    saved = io.BytesIO()
    torch.save(ours.state_dict(), saved)
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in group] for group in params]
    resumed = MasterWeightAdamW([{"params": g, "weight_decay": d} for g, d in zip(copies, decays)], lr=1e-2)
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for p, c in zip(sum(params, []), sum(copies, [])):
        p.grad = c.grad = torch.randn(p.shape).bfloat16()
    ours.step(), resumed.step()
    assert all(torch.equal(p, c) for p, c in zip(sum(params, []), sum(copies, [])))
    assert all(torch.equal(a["params"][0], b["params"][0]) for a, b in zip(ours.param_groups, resumed.param_groups))
    # a state saved without masters (earlier versions of this optimizer) restarts them from the weights
    state = ours.state_dict()
    ours.load_state_dict(dict(state, state={i: {k: v for k, v in group_state.items() if k != "master"}
                                            for i, group_state in state["state"].items()}))
    assert torch.equal(ours.param_groups[0]["params"][0], torch.cat([p.detach().float().flatten() for p in params[0]]))


def test_master_weight_adamw_with_bf16_moments_follows_fp32_adamw():
    """bf16 moments: the same update up to their rounding; they stay bf16 across a save and resume."""
    from finetune.optimizer import MasterWeightAdamW
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(11))]
    references = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = MasterWeightAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95),
                             moments_dtype=torch.bfloat16)
    fp32 = torch.optim.AdamW([{"params": references, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    for step in range(6):
        if step == 3:
            ours.load_state_dict(ours.state_dict())
        for p, r in zip(params, references):
            p.grad = r.grad = torch.randn(p.shape)
        ours.step(), fp32.step()
        state = ours.state[ours.param_groups[0]["params"][0]]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and state["step"] == step + 1
        for p, r in zip(params, references):
            torch.testing.assert_close(p.detach(), r.detach(), atol=3e-4, rtol=0)
    assert (params[0] - references[0].detach()).abs().max() > 0  # the moments were rounded, not kept in fp32


def test_compiled_adamw_update_matches_eager():
    """The GPU path compiles the update (inductor; here its CPU backend): masters and moments updated in place
    as eagerly, in their own dtypes, and the returned weights are the masters' rounding."""
    from finetune.optimizer import adamw_update, compiled_adamw_update
    torch.manual_seed(0)
    for moments_dtype in (torch.float32, torch.bfloat16):
        eager = [torch.randn(1001), torch.zeros(1001, dtype=moments_dtype), torch.zeros(1001, dtype=moments_dtype)]
        compiled = [t.clone() for t in eager]
        for step in range(1, 4):
            grad = torch.randn(1001, dtype=torch.bfloat16)
            coefficients = torch.tensor([1 - 1e-3 / step, 0.1 / step, 0.5 * step, 0.1, 0.95, 0.05, 1e-8])  # per step
            adamw_update(eager[0], grad, *eager[1:], coefficients)
            with torch.compiler.set_stance("fail_on_recompile" if step > 1 else "default"):  # new values, same kernel
                weights = compiled_adamw_update(compiled[0], grad, *compiled[1:], coefficients)
            assert torch.equal(weights, compiled[0].bfloat16()) and compiled[1].dtype == moments_dtype
            for ours, reference in zip(compiled, eager):
                torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_master_weight_adamw_8bit_is_bitsandbytes_adamw8bit_on_the_masters(monkeypatch):
    """--optim adamw_bnb_8bit on a bf16 model without DeepSpeed: bitsandbytes' AdamW8bit applied to the fp32
    concatenation of each group's parameters, exactly; the parameters are the masters' rounding; embedding weights
    keep 32-bit moments (as the Trainer keeps them for bitsandbytes' optimizers); a resumed optimizer continues
    exactly. Masters larger than a chunk are updated chunk by chunk (whole 256-element blocks of the 8-bit states):
    the same update up to fp32 rounding (at chunk ends the CPU kernel rounds a few elements one ulp apart, which
    later steps' 8-bit states can amplify, so one step is compared)."""
    from finetune import optimizer_8bit  # first: it quiets bitsandbytes' import
    from finetune.optimizer import master_weight_optimizer
    import bitsandbytes as bnb

    def run(steps):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in ((64, 70), (300,))]
        embedding = torch.nn.Parameter(torch.randn(50, 16).bfloat16())
        ours = master_weight_optimizer("adamw_bnb_8bit", [{"params": params + [embedding], "weight_decay": 0.1}],
                                       embeddings=[embedding], lr=1e-2, betas=(0.9, 0.95))
        reference = torch.nn.Parameter(torch.cat([p.detach().float().flatten() for p in params]))
        reference_embedding = torch.nn.Parameter(embedding.detach().float())
        references = [bnb.optim.AdamW8bit([reference], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
                      bnb.optim.AdamW([reference_embedding], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)]
        for _ in range(steps):
            for p in params + [embedding]:
                p.grad = torch.randn(p.shape).bfloat16()
            reference.grad = torch.cat([p.grad.float().flatten() for p in params])
            reference_embedding.grad = embedding.grad.float()
            ours.step(), references[0].step(), references[1].step()
            assert torch.equal(torch.cat([p.detach().flatten() for p in params]), ours.flat_masters[0].bfloat16())
            assert all(p.grad is None for p in params + [embedding])
        return ours, params + [embedding], (reference.detach(), reference_embedding.detach().flatten())

    ours, params, references = run(4)
    assert all(torch.equal(m, r) for m, r in zip(ours.flat_masters, references))
    assert [ours.state[group["params"][0]]["state1"].dtype for group in ours.param_groups] == [torch.uint8, torch.float32]
    saved = io.BytesIO()
    torch.save(ours.state_dict(), saved)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = master_weight_optimizer("adamw_bnb_8bit", [{"params": copies, "weight_decay": 0.1}],
                                      embeddings=copies[-1:], lr=1e-2, betas=(0.9, 0.95))
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for p, c in zip(params, copies):
        p.grad = c.grad = torch.randn(p.shape).bfloat16()
    ours.step(), resumed.step()
    assert all(torch.equal(p, c) for p, c in zip(params, copies))

    monkeypatch.setattr(optimizer_8bit, "CHUNK", 2048)
    ours, _, references = run(1)
    assert [m.numel() for m in ours.param_groups[0]["params"]] == [2048, 2048, 684]
    torch.testing.assert_close(ours.flat_masters[0], references[0], rtol=1e-6, atol=1e-7)
