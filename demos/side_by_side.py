"""Launch the side-by-side Gradio demo from a checkout: ``python demos/side_by_side.py [--port N] [--host H]
[--share]`` (the same as ``diffusers-attn demo``)."""

import sys

from diffusers_attn.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
