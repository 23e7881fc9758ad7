#!/bin/bash
# xia2's MOSFLM indexing deck.
data=$1
ipmosflm << eof
template "sim_####.cbf"
directory "$data"
newmat xiaindex.mat
beam 89.6636 84.7272
wavelength 0.979500
distance 120.000000
autoindex dps refine image 1 thresh 20
autoindex dps refine image 45 thresh 20
mosaic estimate 1
go
mosaic estimate 45
go
eof
