// Argument checks shared by every op. Messages name the argument and show the offending value.
#pragma once

#include <ATen/ATen.h>

#include <string>

#define RRM_CHECK_DIM(t, n, what) \
  TORCH_CHECK_VALUE((t).dim() == (n), what, " must have ", n, " dimensions; got shape ", (t).sizes())

#define RRM_CHECK_FLOATING(t, what)                                                           \
  TORCH_CHECK_TYPE((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble, what, \
                   " must be float32 or float64; got ", (t).scalar_type())

#define RRM_CHECK_SAME_DEVICE(a, b, wa, wb)                                                                           \
  TORCH_CHECK_VALUE((a).device() == (b).device(), wa, " and ", wb, " must be on the same device; got ", (a).device(), \
                    " and ", (b).device())

#define RRM_CHECK_SAME_DTYPE(a, b, wa, wb)                                                                     \
  TORCH_CHECK_TYPE((a).scalar_type() == (b).scalar_type(), wa, " and ", wb, " must have the same dtype; got ", \
                   (a).scalar_type(), " and ", (b).scalar_type())
