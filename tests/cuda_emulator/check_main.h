// The command line shared by the emulator's check programs:
//   PROGRAM {SELECTION_A|SELECTION_B|...} {quick|full}
// Header-only; each check program includes it next to its own cases.
#pragma once

#include <cstdio>
#include <initializer_list>
#include <string>

// One selection a check program accepts as its first argument, and the cases it runs
// (`full`: every case; otherwise the quick subset).
struct CheckSelection {
  const char* name;
  void (*run)(bool full);
};

// Runs the selection named on the command line and returns the exit status: 2 (after a
// usage line) for an unknown selection or mode; else, after printing "N failures",
// non-zero iff `failures` (the program's count, raised by its cases) is non-zero.
inline int check_main(int argc, char** argv, const char* program, std::initializer_list<CheckSelection> selections,
                      const int& failures) {
  const std::string which = argc > 1 ? argv[1] : "", mode = argc > 2 ? argv[2] : "quick";
  const CheckSelection* chosen = nullptr;
  std::string names;
  for (const CheckSelection& s : selections) {
    if (which == s.name) chosen = &s;
    names += (names.empty() ? "" : "|") + std::string(s.name);
  }
  if (chosen == nullptr || (mode != "quick" && mode != "full")) {
    std::printf("usage: %s {%s} {quick|full}\n", program, names.c_str());
    return 2;
  }
  chosen->run(mode == "full");
  std::printf("%d failures\n", failures);
  return failures != 0;
}

inline int check_main(int argc, char** argv, const char* program, CheckSelection a, CheckSelection b,
                      const int& failures) {
  return check_main(argc, argv, program, {a, b}, failures);
}
