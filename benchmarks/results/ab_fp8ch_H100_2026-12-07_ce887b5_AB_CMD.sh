# AB_CMD of ab_fp8ch_H100_2026-12-07_ce887b5.log ('bash .ab_cmd.sh', untracked, sent with the tree): the script as it ran
# one side of the A/B (AB_SIDE, AB_OUT set by part ab): fp8_channel prefill and decode (tiles and Gluon), the counted
# decode points, the accumulation test; before_again: the drift point only; after: the GPU tests of the new forms
set -u
B="python3 -m epmoe bench experts -q --no-plot --routings balanced"
if [ "$AB_SIDE" = before_again ]; then
    $B --presets mixtral-8x7b --tokens 8192 --formats fp8_channel --anchors scaled_grouped_mm --backends triton,triton_ws --output $AB_OUT/ab_fp8ch_mixtral_$AB_SIDE.json
    exit 0
fi
python3 -m pytest -q tests/test_fp8_accumulation.py -p no:cacheprovider 2>&1 | tail -12
$B --presets mixtral-8x7b --tokens 1,16,8192 --formats fp8_channel --anchors scaled_grouped_mm --backends triton,triton_ws --output $AB_OUT/ab_fp8ch_mixtral_$AB_SIDE.json
$B --presets deepseek-v3 --experts 32 --tokens 16,8192 --formats fp8_channel --anchors scaled_grouped_mm --backends triton,triton_ws --output $AB_OUT/ab_fp8ch_ds32_$AB_SIDE.json
$B --presets deepseek-v3 --experts 32 --tokens 1,16 --formats fp8_block,fp8_channel --anchors none --backends batched --batched-capacity tight,1024 --output $AB_OUT/ab_counted_ds32_$AB_SIDE.json
if [ "$AB_SIDE" = after ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_fp8_quantize.py "tests/test_triton_gpu.py" -k "test_fp8_quantize or (triton_ws_real_size and channel)" 2>&1 | tail -15
fi
if [ "$AB_SIDE" = after ]; then
    table=epmoe/kernels/configs/$(python3 -c 'import torch; from epmoe.kernels.tuning_table import device_table_name; print(device_table_name(torch.cuda.get_device_name()))').json
    cp "$table" "$AB_OUT/table_before_fp8ch_gluon_tune.json"
    python3 -m epmoe tune --gluon --presets mixtral-8x7b --formats fp8_channel --tokens 8192 2>&1 | tail -20
    python3 -m epmoe tune --gluon --local-experts 32 --hidden 7168 --inter 2048 --top-k 8 --formats fp8_channel --tokens 8192 2>&1 | tail -20
    cp "$table" "$AB_OUT/table_after_fp8ch_gluon_tune.json"
fi
