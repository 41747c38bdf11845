"""What a local step costs against its batch size: why stacking clients (grouped execution) pays off
when steps are overhead-bound and not when they are compute-bound.

Times forward + backward + AdamW on the simulation benchmark's tiny timm ViT (2 blocks x 32 wide,
16 px, BitFit) at several batch sizes, CPU time per step, after warm-up.

    python benchmarks/batch_cost.py [--threads 1] [--batches 8,40,80,160] [--groups 10,16]

The last rows are grouped execution's step: ``torch.func.vmap(grad(functional_call(...)))`` over G
stacked BitFit slots, each on its own batch of 8, plus one AdamW step over the stacked tensors (what
``core/grouped.py`` does per local step of a group, without the engine around it).
"""

from __future__ import annotations

import argparse
import time


def cpu_ms(step, steps: int) -> float:
    """CPU milliseconds per call of ``step``, after 3 warm-up calls."""
    for _ in range(3):
        step()
    t0 = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - t0) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="8,40,80,160")
    parser.add_argument("--groups", default="10,16", help="clients per vmapped group (each a batch of 8)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import timm
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10
    )
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith("bias") or name.startswith("head")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    print("| batch | CPU ms / step | ms / example | cost vs batch 8 |")
    print("|---:|---:|---:|---:|")
    base = None
    for batch in [int(b) for b in args.batches.split(",")]:
        x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))

        def step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        ms = cpu_ms(step, args.steps)
        base = base or ms
        print(f"| {batch} | {ms:.2f} | {ms / batch:.3f} | {ms / base:.2f}x |")
    from torch.func import functional_call, grad, vmap

    for m in model.modules():  # as grouped execution does: the fused kernel has no vmap rule on CPU
        if getattr(m, "fused_attn", None) is True:
            m.fused_attn = False
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())

    def loss_of(slot: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, slot, (x,), strict=False), y)

    vmapped = vmap(grad(loss_of), in_dims=(0, 0, 0), randomness="different")
    for groups in [int(g) for g in args.groups.split(",") if g]:
        stacked = {n: params[n].detach().expand(groups, *params[n].shape).clone() for n in names}
        grouped_optimizer = torch.optim.AdamW(list(stacked.values()), lr=1e-3)
        x, y = torch.randn(groups, 8, 3, 16, 16), torch.randint(0, 10, (groups, 8))

        def grouped_step(x: torch.Tensor = x, y: torch.Tensor = y, stacked: dict = stacked, opt=grouped_optimizer):
            for n, g in vmapped(stacked, x, y).items():
                stacked[n].grad = g
            opt.step()

        ms = cpu_ms(grouped_step, args.steps)
        print(f"| {groups} clients x 8, vmapped | {ms:.2f} | {ms / (groups * 8):.3f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
