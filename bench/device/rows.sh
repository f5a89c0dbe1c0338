# Sourced by the device scripts: `row DIR WORKER [env...]` runs one fresh bench/generate.py worker
# in tree DIR with the caller's $A (ROW_TIMEOUT seconds at most, 200 by default), appends its JSON
# row to $OUT/rows.jsonl and prints it cut, with its wall time.
row() {
  local d=$1 w=$2; shift 2
  (cd "$d" && SECONDS=0 && env "$@" timeout "${ROW_TIMEOUT:-200}" python bench/generate.py $A --worker "$w" \
     2>>$OUT/errors.txt | grep '^{' | tee -a $OUT/rows.jsonl | cut -c1-150; echo "  ($d $w $* ${SECONDS}s)")
}
