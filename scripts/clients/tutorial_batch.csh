#!/bin/csh -f
# The MOSFLM tutorial's batch script (Appendix I), on the simulated sweep.
set data = $1
set ident = sim
set job = e
set img1 = 1
set img2 = 10
set title = "Simulated P212121 sweep"
set project = SIM
set dataset = native
set diverg = "0.02 0.02"
set disp = 0.0002
set polar = 0.95

ipmosflm SPOTOD ${ident}_${job}_${img1}to${img2}.spotod \
         COORDS ${ident}_${job}_${img1}to${img2}.coords \
         SUMMARY ${ident}_${job}_${img1}to${img2}.sum << eof-mosflm
TITLE $title
! the settings saved from an interactive session
TEMPLATE sim_####.cbf
DIRECTORY $data
MATRIX $data/truth.mat
SYMMETRY P212121
MOSAIC 0.3
! Project and dataset names
PNAME $project
DNAME $dataset
! MTZ and scratch file names
HKLOUT ${ident}_${job}_${img1}to${img2}.mtz
GENFILE ${ident}_${job}_${img1}to${img2}.gen
! Beam parameters
DIVERGENCE $diverg
DISPERSION $disp
POLARISATION SYNCH $polar
! Do not refine the cell during integration
POSTREF FIX ALL
PROCESS $img1 TO $img2
PLOT
RUN
eof-mosflm
