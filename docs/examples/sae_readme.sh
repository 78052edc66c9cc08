#!/usr/bin/env bash
# The README's SAE example on the default model (SmolLM2-135M-Instruct), end to end on a CPU:
# record -> train -> eval -> features -> steer with a latent -> a screenshot of the browser.
#
#   bash docs/examples/sae_readme.sh   # from the repository root: runs/readme-sae/, docs/img/sae-browser.png
#
# The corpus is the default one (the sections of Python's reference manual, about 113k tokens
# for this tokenizer). Every fifth section is held out, so the evaluation and the feature browser
# read text the SAE never trained on. Every step resumes or is cheap to repeat.
set -euo pipefail

OUT=${OUT:-runs/readme-sae}
SITE=blocks.6.hook_resid_post
PYTHON=${PYTHON:-python}
ACTSCOPE=${ACTSCOPE:-actscope}
CHROMIUM=${CHROMIUM:-chromium}
TRAIN_TOKENS=${TRAIN_TOKENS:-300000}   # about 3.5 passes over the training store
mkdir -p "$OUT"

# 1. two disjoint slices of the default corpus, as JSONL
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from actscope.data import default_corpus

out = sys.argv[1]
sections = default_corpus()
for name, keep in (("train", lambda i: i % 5 != 2), ("heldout", lambda i: i % 5 == 2)):
    with open(f"{out}/{name}.jsonl", "w") as f:
        for i, text in enumerate(sections):
            if keep(i):
                f.write(json.dumps({"text": text}) + "\n")
PY

# 2. record the residual stream after block 6 (re-running resumes)
"$ACTSCOPE" record --model default --data "$OUT/train.jsonl" --sites "$SITE" --max-tokens 100000 \
    --dtype float32 --out "$OUT/acts"
"$ACTSCOPE" record --model default --data "$OUT/heldout.jsonl" --sites "$SITE" --max-tokens 20000 \
    --dtype float32 --out "$OUT/heldout"

# 3. a TopK SAE, k = 32, 16 x 576 = 9,216 latents (re-running resumes, or finds the work done)
"$ACTSCOPE" sae train --store "$OUT/acts" --site "$SITE" --arch topk --k 32 --expansion 16 \
    --tokens "$TRAIN_TOKENS" --out "$OUT/sae"

# 4. held-out metrics: FVU, L0, dead share, and with the model CE loss recovered, KL score, delta CE
"$ACTSCOPE" sae eval --sae "$OUT/sae" --store "$OUT/heldout" --model default --sequences 64 --out "$OUT/sae-eval.json"

# 5. the feature browser: top contexts and 4 activation bins per latent, logit effects, nearest latents
"$ACTSCOPE" sae features --sae "$OUT/sae" --store "$OUT/heldout" --model default --out "$OUT/features"

# 6. steer with one latent. 7036 is the latent this run's SAE has for the word " Python" (its ten
#    strongest held-out activations all sit on that token; see features.html#7036). The number
#    belongs to this training run: with another torch build or machine, read the browser and set
#    LATENT to the latent you want. --kl 1 picks the largest scale whose next-token KL to the
#    unsteered model on the prompt stays under 1 nat.
LATENT=${LATENT:-7036}
PROMPT=${PROMPT:-"The program stopped, and the message said"}
"$ACTSCOPE" generate --model default --steer-sae "$OUT/sae" --latent "$LATENT" --kl 1 --prompt "$PROMPT" \
    --max-new-tokens 30 --compare | tee "$OUT/steered.txt"

# 7. a screenshot of the browser, opened on that latent (the URL fragment is a search)
mkdir -p docs/img
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=20000 \
    --user-data-dir="$OUT/chromium-profile" --window-size=1200,900 --screenshot=docs/img/sae-browser.png \
    "file://$PWD/$OUT/features/features.html#$LATENT"
