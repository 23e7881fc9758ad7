#!/bin/bash
# xia2's MOSFLM integration deck (HKLOUT on the command line, as xia2 gives it).
data=$1
mat=${2:-$data/truth.mat}
ipmosflm HKLOUT xia2_integrate.mtz << eof
profile nooptimise
harvest on
pname P
xname X
dname D
template "sim_####.cbf"
directory "$data"
matrix $mat
beam 89.6636 84.7272
distance 120.0
mosaic 0.30
refinement include partials
symmetry 19
postref fix all
postref maxresidual 5.0
genfile integrate.gen
separation close
process 1 60
go
eof
