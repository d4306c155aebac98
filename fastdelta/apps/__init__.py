"""The applications built on the library: the command line (cli), the demo, the training-step benchmark
(bench) and the paper's comparison on the user's data (compare). The library (everything outside this
package) never imports from here; fastdelta/__init__.py presents compare and CompareSettings, loaded on
first use (`import fastdelta` loads no application)."""
