#!/usr/bin/env bash
# Makes docs/cka_map_example.png, the picture in the README, on GENERATED data (class-coloured striped images
# in CIFAR-100's on-disk format, from tests/cifar_fixtures.py), on CPU in a few minutes:
# a resnet20 teacher trained from scratch, resnet8 students distilled from it with KD and with RCKA, then
# cifar100/cka_map.py --compare. The numbers say nothing about real CIFAR-100; the picture shows the tool.
# Run from the repository root: bash docs/cka_map_example.sh [work dir, default /tmp/cka_map_example]
set -euo pipefail
work=${1:-/tmp/cka_map_example}
python - "$work" <<'PY'
import sys
sys.path.insert(0, "tests")
from cifar_fixtures import write_fake_cifar100
write_fake_cifar100(sys.argv[1] + "/data", n_train=1000, n_test=500, seed=0)
PY
common=(--data_path "$work/data" --no_verify_data --no_download --device cpu --print_freq 1000)
python cifar100/train.py --student resnet20 --epochs 4 --lr_decay_epochs 3 --output_dir "$work/teacher" "${common[@]}"
for method in kd rcka; do
    python cifar100/train.py --teacher resnet20 --student resnet8 --method "$method" --epochs 3 --lr_decay_epochs 2 \
        --teacher_ckpt "$work/teacher/student_best.pth" --output_dir "$work/$method" "${common[@]}"
done
python cifar100/cka_map.py --compare "$work/kd" "$work/rcka" --output_dir "$work/map" \
    --title "resnet20 teacher vs resnet8 students, KD and RCKA (GENERATED data, not CIFAR-100)" "${common[@]:0:6}"
cp "$work/map/cka_map.png" docs/cka_map_example.png
