#!/usr/bin/env bash
# Inputs for the `precision` step of scripts/gpu_check.sh, gathered into gpu_inputs/ (about 13 MB, git-ignored; the
# device call carries it: `carry: ["gpu_inputs", ".whl"]`): the demo's trained tiny model (run/: checkpoint +
# tokenizer) and its held-out synthetic EgoMCQ set (data/egomcq.json + the held-out videos it reads); and in .whl/
# the locked PyAV for the GPU image's Python 3.12 (about 36 MB; the image has no video decoder for Python, and the
# questions' videos need one), which gpu_check.sh installs first. Needs a package index here.
# Usage (repository root, after `egovlp-deploy demo --out DEMO_OUT`):  bash scripts/gpu_inputs.sh DEMO_OUT
set -euo pipefail
demo=${1:?usage: scripts/gpu_inputs.sh DEMO_OUT (a finished egovlp-deploy demo folder)}
cd "$(dirname "$0")/.."
for need in run/checkpoints run/tokenizer data/egomcq.json; do
  [[ -e "$demo/$need" ]] || { echo "$demo/$need is missing: not a finished demo folder" >&2; exit 2; }
done
[[ ! -e gpu_inputs ]] || { echo "gpu_inputs/ exists: remove it first" >&2; exit 2; }
staging=$(mktemp -d gpu_inputs.XXXXXX)
trap 'rm -rf "$staging"' EXIT  # a half-gathered folder is never left behind (after the move it is gone already)
mkdir -p "$staging/data/videos"
cp -r "$demo/run" "$staging/run"
cp "$demo/data/egomcq.json" "$staging/data/"
# only the videos the questions read (the held-out ones), not the training set
uids=$(python3 - "$demo/data/egomcq.json" <<'PY'
import json, sys
questions = json.load(open(sys.argv[1]))
uids = {c["video_uid"] for q in questions.values() for c in [q["query"], *q["choices"].values()]}
print("\n".join(sorted(uids)))
PY
)
[[ -n $uids ]] || { echo "$demo/data/egomcq.json names no video" >&2; exit 2; }
while IFS= read -r uid; do
  cp -r "$demo/data/videos/$uid" "$staging/data/videos/"
done <<< "$uids"
av=$(grep -E '^av==' requirements.lock) || { echo "requirements.lock pins no av==" >&2; exit 2; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$av"
chmod 755 "$staging"  # mktemp's 0700 would follow the folder
mv "$staging" gpu_inputs
du -sh gpu_inputs .whl
