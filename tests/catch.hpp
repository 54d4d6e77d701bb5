// Includes Catch2 whichever major version was found: tests write `#include "catch.hpp"`.
#pragma once
#ifdef TOPTHETA_CATCH2_V3
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif
