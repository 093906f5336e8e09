// Included by ProcessGroupGloo.hpp; no name from it is used.
#pragma once
namespace gloo {}
