#!/bin/bash
# An iMosflm batch integration job: saved settings, then PROCESS and RUN, with XML responses.
data=$1
ipmosflm XMLFILE sim_batch.xml SUMMARY sim_batch.sum SPOTOD sim_batch.spt COORDS sim_batch.coords << eof
template "sim_####.cbf"
directory "$data"
beam 89.6636 84.7272
distance 120.0
matrix "$data/truth.mat"
symmetry P212121
mosaic 0.30
hklout sim_batch.mtz
divergence 0.02 0.02
dispersion 0.0002
polarisation synch 0.95
postref fix all
process 1 to 6
run
eof
