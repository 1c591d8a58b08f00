/* Encodes a dterm into an ei_x_buff (external term format for the BEAM). */
#ifndef DSPEX_DTERM_EI_H
#define DSPEX_DTERM_EI_H
#include <ei.h>
#include "dterm.h"
/* Returns 0 or -1 (atom longer than 255 bytes, non-finite float, no memory). */
int dt_encode_ei(ei_x_buff *x, const dterm *t);
#endif
