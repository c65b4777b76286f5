#!/usr/bin/env python
"""Convert a pretrained MDLM into an FP-MDLM: the documented launcher path of `fpmgm-convert`.

    accelerate launch conversion/convert.py --mdlm kuleshov-group/mdlm-owt --map 1,6,12 --data openwebtext \\
        --steps 40000 --output outputs/fp-mdlm-owt

The code lives in the package (`fpmgm_hf.conversion.convert`, installed as the `fpmgm-convert` command); this
file only runs it, so `accelerate launch conversion/convert.py ...`, `torchrun ... conversion/convert.py ...`
and `fpmgm-convert ...` are the same program. `python conversion/convert.py --help` lists every flag.
"""

import sys

from fpmgm_hf.conversion.convert import *  # noqa: F401,F403  (the script's old public names)
from fpmgm_hf.conversion.convert import main

if __name__ == "__main__":
    sys.exit(main())
