/* Minimal Cortex-M startup for effc firmware (no vendor SDK): vector table, FPU enable, .data copy, .bss zero,
   SysTick overflow counter for instruction counting, then main() and exit(). Linked with --specs=rdimon.specs
   -nostartfiles so printf/fopen go over semihosting. */
#include <stdint.h>
#include <stdlib.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);
extern void initialise_monitor_handles(void);

volatile uint32_t effc_systick_wraps;

void _init(void) {}
void _fini(void) {}

void Reset_Handler(void);
void Default_Handler(void);
void SysTick_Handler(void);

void Default_Handler(void) {
  for (;;) {
  }
}

void SysTick_Handler(void) { effc_systick_wraps++; }

__attribute__((section(".isr_vector"), used)) void (*const effc_vectors[16])(void) = {
    (void (*)(void))(&_estack), Reset_Handler, Default_Handler, Default_Handler, Default_Handler,
    Default_Handler, Default_Handler, 0, 0, 0, 0, Default_Handler, Default_Handler, 0, Default_Handler,
    SysTick_Handler,
};

void Reset_Handler(void) {
  uint32_t* src = &_sidata;
  uint32_t* dst;
#if defined(__ARM_FP)
  /* CPACR: full access to CP10/CP11 before any floating-point instruction. */
  *(volatile uint32_t*)0xE000ED88u |= (0xFu << 20);
  __asm volatile("dsb\n isb");
#endif
  for (dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (dst = &_sbss; dst < &_ebss;) *dst++ = 0u;
  initialise_monitor_handles();
  exit(main());
}
