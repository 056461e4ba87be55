"""lora_mlp.py's SwiGLU kernels at LoRA ranks 16 to 128 on a GPU (4,096 tokens x 14,336): each result against a float32
reference, and the pipeline depth each kernel fell back to where its buffers did not fit shared memory.

    python3 bench/swiglu_ranks.py
"""

import torch

from studio.training.fast import lora_mlp


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def main() -> None:
    torch.manual_seed(0)
    tokens, width = 4096, 14336

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale
    for rank in (16, 48, 64, 128):
        g, u, xa = randn(tokens, width), randn(tokens, width), randn(tokens, 2 * rank)
        bg, bu = randn(width, rank, scale=1 / rank), randn(width, rank, scale=1 / rank)
        gate = g.float() + xa[:, :rank].float() @ bg.float().t()
        up = u.float() + xa[:, rank:].float() @ bu.float().t()
        forward_error = relative_error(lora_mlp.swiglu_forward(g, u, xa, bg, bu), torch.nn.functional.silu(gate) * up)
        dh, gd, ad = randn(tokens, width), randn(tokens, rank), randn(rank, width, scale=1 / rank)
        lora_mlp.swiglu_backward(dh, g, u, xa, bg, bu, gd, ad)  # g and u become the gate's and up's gradients
        sig = torch.sigmoid(gate)
        grad = dh.float() + gd.float() @ ad.float()
        backward_error = relative_error(g, grad * up * (sig + gate * sig * (1 - sig)))
        fell_back = {(k[0].__name__, k[1]): v for k, v in lora_mlp._stages_that_fit.items()}
        print(f"rank {rank}: forward error {forward_error:.1e}, backward error {backward_error:.1e}; "
              f"stages where {lora_mlp.STAGES} did not fit: {fell_back}", flush=True)


if __name__ == "__main__":
    main()
