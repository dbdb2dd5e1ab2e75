from benchmarks.lm_compare.run import main

main()
