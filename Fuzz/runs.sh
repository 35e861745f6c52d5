#!/bin/sh
# The recorded long runs of docs/FUZZING.md (release + libFuzzer, one after another).
cd "$(dirname "$0")"
export SWIFT_BACKTRACE=enable=no
run() { name=$1; corpus=$2; shift 2
  echo "== $name $corpus $* ($(date -u +%H:%M:%S))"
  /usr/bin/time -v .build/release/$name corpus/$corpus -seed=1 -print_final_stats=1 -rss_limit_mb=2048 -timeout=20 "$@" > runs/$name-$corpus.log 2>&1
  echo "rc=$?"; grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|TIS ops|ERROR|Elapsed' runs/$name-$corpus.log
}
run TISFuzz tis -max_total_time=420 -max_len=8192 -len_control=0
run StreamFuzz stream -max_total_time=300 -max_len=8192 -len_control=0
run CtrlReplyFuzz ctrl -max_total_time=120
run StreamFuzz stream-whole -max_total_time=120
