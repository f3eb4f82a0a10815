"""Compare one backward pass of ResNet-20 in fp32, contiguous and channels-last, against float64.

    python scripts/check_layout_precision.py [--batch 64] [--seed 0]

Prints the relative L2 error of the loss and of all gradients together, and the median
over parameter tensors, for each layout. On CPU this shows whether the channels-last
convolutions compute different numbers from the contiguous ones, which the P3 rows of
scripts/bench_lookaround.py cannot tell apart from seed noise.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lookaround_dist.models import build_model  # noqa: E402


def loss_and_gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return loss.double().item(), [p.grad.double() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images in the batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights and input seed (default: %(default)s)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = build_model("resnet20", 10)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))
    reference_loss, reference = loss_and_gradients(copy.deepcopy(model).double(), images.double(), labels)
    reference_flat = torch.cat([g.flatten() for g in reference])

    print(f"torch {torch.__version__}, ResNet-20, batch {args.batch}, train mode, one thread")
    for layout in (torch.contiguous_format, torch.channels_last):
        loss, gradients = loss_and_gradients(copy.deepcopy(model).to(memory_format=layout),
                                             images.contiguous(memory_format=layout), labels)
        flat = torch.cat([g.flatten() for g in gradients])
        total = ((flat - reference_flat).norm() / reference_flat.norm()).item()
        median = statistics.median(((g - r).norm() / r.norm()).item() for g, r in zip(gradients, reference))
        print(f"fp32 {str(layout).removeprefix('torch.'):<18} loss error {abs(loss - reference_loss) / reference_loss:.1e}, "
              f"gradient error {total:.2e} (all together), {median:.2e} (median over tensors)")


if __name__ == "__main__":
    main()
