"""Summarize py-spy raw (collapsed) stacks: inclusive and self sample counts per frame."""
import collections, sys
path = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
incl, self_ = collections.Counter(), collections.Counter()
total = 0
for line in open(path):
    stack, _, count = line.rstrip().rpartition(" ")
    if not stack: continue
    c = int(count); total += c
    frames = stack.split(";")
    for f in set(frames): incl[f] += c
    self_[frames[-1]] += c
print(f"{total} samples")
print("-- inclusive"); [print(f"{v/total:6.1%} {k}") for k, v in incl.most_common(n)]
print("-- self"); [print(f"{v/total:6.1%} {k}") for k, v in self_.most_common(n)]
