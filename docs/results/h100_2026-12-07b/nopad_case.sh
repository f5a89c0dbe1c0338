# The `nopad` case of bench/device/next_session.sh as calls 4 ran it (call 3 ran the tests one
# tree after the other with a 150 s timeout each); retired with the merge. Sourced after
# next_session.sh's preamble (PYTHONPATH=., A="--model llama3-8b --short 8 --long 136 --repeats 3",
# bench/device/rows.sh), carry [".work/groups", ".work/nopad"].
for t in groups nopad; do
  (cd .work/$t && timeout 330 python -m pytest -q tests/test_kernels.py \
      -k "lora or decode or sharing_an_input" > $OUT/gpu_tests_$t.txt 2>&1) &
done; wait
for t in groups nopad; do
  echo "$t: $(tail -1 $OUT/gpu_tests_$t.txt)"; grep -m3 -E "^E  |^FAILED" $OUT/gpu_tests_$t.txt | cut -c1-300
done
ok() { tail -1 $OUT/gpu_tests_$1.txt | grep " passed" | grep -qv failed; }
trees="."; ok groups && trees="$trees .work/groups"; ok nopad && trees="$trees .work/nopad"
for t in $trees; do row $t ours:auto; done
# call 5: for t in .work/nopad . .work/nopad .work/groups; do row $t ours:auto; done, then
# (cd .work/nopad && python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:auto --profile)
