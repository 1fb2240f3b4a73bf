"""Convert an EDM network snapshot to a dmd_minimal denoiser file.

    python -m dmd_minimal.convert_edm edm-cifar10-32x32-cond-vp.pkl cifar10-cond.pt

The output {"denoiser": denoiser_to_dict(...)} loads with torch.load(weights_only=True) and with
dmd_minimal.load_denoiser; no pickled code travels with it. Dropout is set to 0, as DMD distils.
"""
import argparse
import sys

from .load import load_denoiser
from .networks import denoiser_to_dict
from .utils import DMDError, atomic_save


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dmd_minimal.convert_edm", description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", help="EDM network snapshot (.pkl), a path or an http(s) URL")
    parser.add_argument("out", help="the .pt file to write")
    args = parser.parse_args(argv)
    try:
        denoiser = load_denoiser(args.snapshot)
        stored = denoiser_to_dict(denoiser)
        atomic_save(dict(denoiser=stored), args.out)
        count = sum(p.numel() for p in denoiser.parameters())
        print(f"wrote {args.out}: {stored['arch']}, label_dim {stored['label_dim']}, {count / 1e6:.1f}M parameters")
    except DMDError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
