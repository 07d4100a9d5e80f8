"""The synthetic ads workload: catalog, typed-block prompts, reference answers, JSONL export.

Modules, bottom up: lexicon (constant vocabulary) -> settings -> catalog (items, users,
inventory timeline) -> blocks (block texts) -> facts (what an answer may claim) -> writer
(stochastic reference answers, one voice per pool) -> prompts -> assemble (the whole workload)
-> export (JSONL files, GenerateRequest). corpus_stats measures 4-gram overlap per pool.
"""
