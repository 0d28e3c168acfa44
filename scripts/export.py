"""Export a training run to Hugging Face format (GPT2LMHeadModel + its tokenizer + a model card).

    python -m scripts.export --out_dir=out --to=out-hf
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('out-hf')"
    python sample.py --init_from=out-hf            # our sampler reads the export back
    lm_eval --model hf --model_args pretrained=out-hf --tasks ...

Reads out_dir/ckpt.pt; needs transformers (pip install -e .[hf]). After writing, the folder is loaded back with
transformers and its logits compared with ours; the largest difference is printed, and above 1e-4 nothing is kept.
"""

import shlex
import sys
from dataclasses import dataclass

from gpt_residual import config, hf_export
from gpt_residual.errors import USER_ERRORS


@dataclass
class ExportConfig:
    out_dir: str = "out"  # the training run whose ckpt.pt to export
    to: str = ""  # the folder to write (new, or empty)

    def __post_init__(self):
        if not self.to:
            raise config.ConfigError("say where to write the export: --to=FOLDER (a new or empty folder)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config.help_text(ExportConfig, __doc__.strip()))
        return 0
    try:
        cfg = config.parse_args(ExportConfig, argv, allow_file=False)
        command = shlex.join(["python", "-m", "scripts.export", *argv])
        diff = hf_export.export(cfg.out_dir, cfg.to, command)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {cfg.out_dir} to {cfg.to}: largest logit difference against our model {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
