#!/bin/bash
# The MOSFLM tutorial's batch script (Appendix I) in bash, on the simulated sweep.
data=$1
ident=sim; job=b; img1=1; img2=10
ipmosflm SPOTOD ${ident}_${job}_${img1}to${img2}.spotod \
         COORDS ${ident}_${job}_${img1}to${img2}.coords \
         SUMMARY ${ident}_${job}_${img1}to${img2}.sum << eof-mosflm
TITLE Simulated P212121 sweep
TEMPLATE sim_####.cbf
DIRECTORY $data
MATRIX $data/truth.mat
SYMMETRY P212121
MOSAIC 0.3
PNAME SIM
DNAME native
HKLOUT ${ident}_${job}_${img1}to${img2}.mtz
GENFILE ${ident}_${job}_${img1}to${img2}.gen
DIVERGENCE 0.02 0.02
DISPERSION 0.0002
POLARISATION SYNCH 0.95
POSTREF FIX ALL
PROCESS $img1 TO $img2
PLOT
RUN
eof-mosflm
