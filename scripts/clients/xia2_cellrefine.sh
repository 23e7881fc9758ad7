#!/bin/bash
# xia2's MOSFLM cell-refinement deck: two segments far apart in phi (needs xiaindex.mat, or the truth).
data=$1
mat=${2:-$data/truth.mat}
ipmosflm << eof
template "sim_####.cbf"
directory "$data"
matrix $mat
newmat xiarefine.mat
beam 89.6636 84.7272
distance 120.0
symmetry 19
mosaic 0.30
postref fix mosaic
separation close
refinement residual 15.0
refinement include partials
postref multi segments 2 repeat 10
postref maxresidual 5.0
genfile refine.gen
process 1 3
go
process 58 60
go
eof
