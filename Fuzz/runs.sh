#!/bin/sh
# The recorded long runs of docs/FUZZING.md: release + libFuzzer, each single-threaded.
#   ./runs.sh NAME CORPUS SECONDS [libFuzzer options...]
# NAME: TISFuzz, StreamFuzz, CtrlReplyFuzz; CORPUS: a directory under corpus/ (created and
# seeded from Tests/FuzzTests/Corpus/CORPUS, or the real QEMU streams for stream-whole).
cd "$(dirname "$0")"
export SWIFT_BACKTRACE=enable=no
name=$1; corpus=$2; secs=$3; shift 3
mkdir -p runs corpus/$corpus
if [ -d ../Tests/FuzzTests/Corpus/$corpus ]; then cp -n ../Tests/FuzzTests/Corpus/$corpus/* corpus/$corpus/ 2>/dev/null; fi
if [ "$corpus" = stream-whole ]; then cp -n ../Tests/VMStateTests/Fixtures/*.bin corpus/$corpus/; fi
rm -f corpus/$corpus/.keep
echo "== $name corpus/$corpus -max_total_time=$secs $* (start $(date -u +%H:%M:%S))"
/usr/bin/time -v nice -n 5 .build/release/$name corpus/$corpus -seed=1 -print_final_stats=1 -rss_limit_mb=2048 -timeout=20 \
    -max_total_time=$secs "$@" > runs/$name-$corpus.log 2>&1
echo "rc=$? (end $(date -u +%H:%M:%S))"
grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|TIS ops|ERROR|Elapsed|Maximum resident' runs/$name-$corpus.log
